"""Upstream's per-sample pipeline in Python, the peer of `otter bench data`.

Same files, same work per sample as Otter's MIMIC-IT dataset class: prompt from the
instructions, HF tokenizer (fast, Rust-backed) without special tokens + [<s>] ... [</s>],
then for each image: base64 decode (images JSON loaded whole, as upstream does), PIL open,
convert RGB, resize (S, S) BICUBIC, /255 as float32, normalize with CLIP mean/std.
Single thread. Prints one line like the Rust side.
"""
import base64, io, json, sys, time
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

def main(data_dir, tokenizer_path, n, size):
    ins = json.load(open(f"{data_dir}/SYN_instructions.json"))["data"]
    images = json.load(open(f"{data_dir}/SYN.json"))  # upstream: whole file in RAM
    train = json.load(open(f"{data_dir}/SYN_train.json"))
    tok = Tokenizer.from_file(tokenizer_path)
    mean = np.array([0.481, 0.458, 0.408], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.269, 0.261, 0.276], dtype=np.float32).reshape(3, 1, 1)
    queries = sorted(train)[:n]

    def build(q):
        chain = train[q] + [q]
        text, pixels = "", []
        for i in chain:
            r = ins[i]
            text += f"<image>User:{r['instruction'].strip(' ').strip(chr(10))} GPT:<answer>{r['answer'].strip().replace(chr(13)+chr(10), chr(10))}<|endofchunk|>"
            raw = base64.urlsafe_b64decode(images[r["image_ids"][0]].replace("+", "-").replace("/", "_"))
            img = Image.open(io.BytesIO(raw)).convert("RGB").resize((size, size), Image.BICUBIC)
            x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            pixels.append((x - mean) / std)
        ids = [0] + tok.encode(text, add_special_tokens=False).ids + [1]
        return ids, np.stack(pixels)

    for q in queries[:4]:
        build(q)
    t0 = time.perf_counter()
    n_img = n_tok = 0
    for q in queries:
        ids, px = build(q)
        n_img += px.shape[0]
        n_tok += len(ids)
    secs = time.perf_counter() - t0
    print(f"python samples={len(queries)} images={n_img} tokens={n_tok} seconds={secs:.3f} "
          f"samples_per_s={len(queries)/secs:.2f} images_per_s={n_img/secs:.2f}")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
