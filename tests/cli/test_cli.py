import json

from tests.helpers import assert_clean_error, run_cli


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "info" in proc.stdout


def test_info_gpt2_small():
    proc = run_cli("info", "--model", "gpt2-small")
    assert proc.returncode == 0, proc.stderr
    assert "124,439,808" in proc.stdout


def test_info_json_and_config_file(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"vocab_size": 100, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 1}))
    proc = run_cli("info", "--model", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    # 100*8 + 16*8 + layer (2*16 + 8*24+24 + 8*8+8 + 8*32+32 + 32*8+8) + final norm 16
    assert info["parameters"] == 800 + 128 + (32 + 216 + 72 + 288 + 264) + 16


def test_info_bad_inputs(tmp_path):
    assert_clean_error(run_cli("info", "--model", "gpt-17"), 2, "gpt-17")
    bad = tmp_path / "bad.json"
    bad.write_text('{"emb_dim": 10, "n_heads": 3}')
    assert_clean_error(run_cli("info", "--model", str(bad)), 2, "divisible")
    assert_clean_error(run_cli("info"), 2, "--model")


def test_random_weights_warning_says_what_it_means_for_the_verb():
    proc = run_cli("eval", "--model", "gpt-nano", "--text", "A few words to score.", "--json")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "random weights" in warning[0] and "untrained model" in warning[0]
    assert "gibberish" not in proc.stderr


def test_convert_never_overwrites_silently(tmp_path):
    import torch

    from gptlab import GPTModel, save_model
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    save_model(GPTModel(tiny_config()), tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "model.safetensors").write_bytes(b"someone else's weights")
    assert_clean_error(run_cli("convert", str(tmp_path / "src"), "--to", "gptlab", str(tmp_path / "dst")), 2,
                       "already holds files", "--force")
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == b"someone else's weights"
    proc = run_cli("convert", str(tmp_path / "src"), "--to", "gptlab", str(tmp_path / "dst"), "--force")
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    written, source = load_file(tmp_path / "dst" / "model.safetensors"), load_file(tmp_path / "src" / "model.safetensors")
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
