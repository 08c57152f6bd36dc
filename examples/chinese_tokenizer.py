"""Your own tokenizer on Chinese text: train a byte-level BPE and a small model with it, then sample.

    python examples/chinese_tokenizer.py              # works in a temporary folder, about a minute on a CPU
    python examples/chinese_tokenizer.py --out zh     # keeps the text, the tokenizer and the model in zh/

The same with the command line, on the files this script writes to zh/text:

    gptlab tokenizer train --data zh/text --vocab-size 600 --out zh/tok
    gptlab train --data zh/text --tokenizer zh/tok --model zh/tiny.json --max-steps 400 --out zh/run
    gptlab generate --model zh/run --prompt "春天" --temperature 0.8 --top-k 20

The paragraphs below were written for this example; like the rest of gptlab they are under the MIT
licence. Ten short paragraphs are far too little text to learn Chinese: the model learns these
paragraphs, which is enough to see the tokenizer at work (its pieces are whole words and phrases of
the text, where GPT-2's are two or three bytes of one character).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gptlab import (
    GPTConfig,
    GPTModel,
    create_dataloader,
    generate,
    get_tokenizer,
    load_documents,
    load_pretrained,
    save_model,
    score_tokens,
    text_to_token_ids,
    token_ids_to_text,
    tokenize_documents,
    tokenizer_of,
    train,
    train_tokenizer,
)

PARAGRAPHS = [
    "清晨的小镇很安静。街角的面包店最早开门，烤面包的香味顺着风飘到河边。卖菜的老人推着车慢慢走过石桥，车上的青菜还带着露水。",
    "春天来的时候，山坡上的茶树冒出嫩芽。采茶的人背着竹篓，一边说笑一边把最嫩的叶子摘下来。傍晚，炒茶的锅里发出沙沙的声音，整个村子都是茶香。",
    "图书馆在学校的东边，是一座红砖小楼。窗户很大，下午的阳光照在长长的木桌上。学生们安静地读书，偶尔有人轻轻翻动书页。",
    "夏天的雨来得很急。刚才还是晴天，转眼间乌云就盖住了天空。雨点打在屋顶上，像许多小鼓一起敲响。雨停以后，空气变得凉爽，院子里的花开得更红了。",
    "秋天，田里的稻子黄了。农民们早早下地，把成熟的稻子割下来，捆成一把一把。孩子们在田埂上追着蜻蜓跑，笑声传得很远。",
    "冬天的夜晚很长。一家人围着火炉坐着，奶奶讲从前的故事，爷爷慢慢喝着热茶。窗外下着小雪，路灯下的雪花像白色的蝴蝶。",
    "火车站总是很热闹。有人提着行李匆匆赶路，有人站在站台上挥手告别。广播里不停地报着车次，一列列火车开往远方的城市。",
    "城市的公园里有一片小湖。早上，老人们在湖边打太极拳，年轻人沿着小路跑步。湖面上有几只白鸭，慢慢地游来游去。",
    "写信是一件慢慢的事情。先想好要说的话，再一笔一画地写在纸上。信寄出去以后，要等好几天才有回音，可是等待本身也是一种快乐。",
    "学做饭的第一天，我把米饭煮糊了。妈妈没有生气，只是笑着说，多做几次就会了。后来我学会了炒青菜，也学会了煮一锅好喝的汤。",
]
HELD_OUT = "春天的早上，老人们在湖边慢慢地喝茶，孩子们在田埂上追着蝴蝶跑。"  # text the model never sees
# vocab_size: replaced by the tokenizer's size (gptlab train does the same)
MODEL = GPTConfig(vocab_size=600, context_length=32, emb_dim=96, n_heads=4, n_layers=3, drop_rate=0.1)


def write_texts(root: Path) -> Path:
    """One file per paragraph: every file is one document, <|endoftext|> between them."""
    folder = root / "text"
    folder.mkdir(parents=True, exist_ok=True)
    for i, paragraph in enumerate(PARAGRAPHS):
        (folder / f"{i:02d}.txt").write_text(paragraph + "\n", encoding="utf-8")
    return folder


def compare(tokenizer, text: str) -> None:
    gpt2 = get_tokenizer("gpt2")
    ours, theirs = len(tokenizer.encode(text)), len(gpt2.encode(text))
    print(f"{len(text)} characters: {theirs} GPT-2 tokens ({theirs / len(text):.2f} per character), {ours} tokens "
          f"of our own ({ours / len(text):.2f} per character, {ours / theirs:.2f}x GPT-2's)")
    sample = "春天来的时候"
    print(f"{sample!r}: GPT-2 {[gpt2.decode([i]) for i in gpt2.encode(sample)]}")
    print(f"{sample!r}: ours  {[tokenizer.decode([i]) for i in tokenizer.encode(sample)]}")


def train_model(tokenizer, text_dir: Path, steps: int) -> GPTModel:
    ids = tokenize_documents(load_documents([text_dir]), tokenizer)  # documents joined by <|endoftext|>
    cut = int(0.9 * len(ids))
    train_loader = create_dataloader(ids[:cut], batch_size=8, max_length=32, stride=4, seed=0)
    val_loader = create_dataloader(ids[cut:], batch_size=8, max_length=32, stride=32, shuffle=False,
                                   drop_last=False)
    torch.manual_seed(0)
    model = GPTModel(MODEL.replace(vocab_size=tokenizer.n_vocab))  # the vocabulary is the tokenizer's
    model.tokenizer = tokenizer  # carried with the model: save_model stores it, generation uses it
    print(f"model: {model.num_parameters():,} parameters; {len(ids):,} tokens, {steps} steps")
    result = train(model, train_loader, val_loader, max_steps=steps, eval_every=100, lr=3e-3, warmup_steps=20,
                   quiet=True, sample_prompt="春天", sample_temperature=0.0)
    last = result.metrics[-1]
    print(f"validation: loss {last['val_loss']:.3f}, {last['val_bpb']:.3f} bits per byte")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="keep everything in this folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (400)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        text_dir = write_texts(root)
        tokenizer = train_tokenizer([text_dir], 600, root / "tok", force=True)
        print(f"tokenizer {tokenizer.name}: {tokenizer.n_vocab} tokens ({tokenizer.eot_token} = {tokenizer.eot_id})")
        compare(tokenizer, "".join(PARAGRAPHS))
        model = train_model(tokenizer, text_dir, args.steps)
        save_model(model, root / "model")  # config.json, model.safetensors, tokenizer.json, tokenizer_config.json
        (root / "tiny.json").write_text(json.dumps(MODEL.to_dict()))
        model = load_pretrained(root / "model")  # comes back with its tokenizer
        tokenizer = tokenizer_of(model)
        held_out = score_tokens(model, text_to_token_ids(HELD_OUT, tokenizer)[0])
        print(f"held-out sentence: {held_out.bits_per_byte:.3f} bits per byte ({held_out.tokens} tokens scored)")
        for prompt in ("春天", "冬天的夜晚", "图书馆"):
            out = generate(model, text_to_token_ids(prompt, tokenizer), max_new_tokens=40, temperature=0.8,
                           top_k=20, seed=1, eos_id=tokenizer.eot_id)
            print(f"{prompt} -> {token_ids_to_text(out, tokenizer)}")
        if args.out:
            print(f"kept in {root}: text/, tok/, model/ (try: gptlab generate --model {root / 'model'} --prompt 春天)")


if __name__ == "__main__":
    main()
