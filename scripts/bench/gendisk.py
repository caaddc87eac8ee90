#!/usr/bin/env python3
"""Write a benchmark disk: a sparse raw file whose content follows from a seed.

    gendisk.py OUT SIZE_BYTES SEED [--random F] [--text F] [--max-extent BYTES]

The disk is cut into extents (64 KiB multiples, up to --max-extent, sizes drawn
from the seed), each of one kind, in a seeded shuffled order:
  random  pseudo-random bytes (AES-128-CTR keystream keyed by the seed, via
          openssl): incompressible, like encrypted or already compressed files;
  text    natural-language-like paragraphs (a Zipf vocabulary of made-up
          words, sentences, paragraphs), drawn at random from a pool, so no two
          4 MiB pieces repeat; zstd -1 shrinks it about 2.5x, like real text;
  zero    never written: a hole in the raw file, unallocated once converted.
Fractions of random and text default to 0.4 and 0.3 (the rest is zero).
Prints one JSON line: the byte count of each kind. Same arguments, same bytes.
"""
import argparse
import hashlib
import json
import random
import subprocess
import sys

UNIT = 64 << 10


def keystream(seed):
    key = hashlib.sha256(b"vmbackup bench random %d" % seed).hexdigest()[:32]
    return subprocess.Popen(
        ["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key,
         "-iv", "0" * 32, "-in", "/dev/zero"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def paragraph_pool(rng, words=1_500_000):
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    freq = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
            2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]
    vocab, seen = [], set()
    while len(vocab) < 30000:
        n = min(14, max(1, int(rng.gammavariate(2.2, 2.3))))
        w = "".join(rng.choices(letters, freq, k=n))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    cum, s = [], 0.0
    for rank in range(len(vocab)):
        s += 1.0 / (rank + 1) ** 1.05
        cum.append(s)
    stream = rng.choices(vocab, cum_weights=cum, k=words)
    pool, i = [], 0
    while i < len(stream):
        sentences = []
        for _ in range(rng.randint(2, 7)):
            n = rng.randint(4, 24)
            ws = stream[i:i + n]
            i += n
            if not ws:
                break
            s = " ".join(ws)
            sentences.append(s[0].upper() + s[1:] + rng.choice("....?!;"))
        if sentences:
            pool.append((" ".join(sentences) + "\n\n").encode())
    return pool


def extents(rng, total, max_units):
    """Sizes (multiples of UNIT) summing to `total` bytes."""
    out, left = [], total // UNIT
    while left > 0:
        n = min(left, rng.randint(1, max_units))
        out.append(n * UNIT)
        left -= n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("size", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--random", type=float, default=0.4)
    ap.add_argument("--text", type=float, default=0.3)
    ap.add_argument("--max-extent", type=int, default=64 << 20)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    size = a.size // UNIT * UNIT
    want = {"random": int(size * a.random) // UNIT * UNIT,
            "text": int(size * a.text) // UNIT * UNIT}
    want["zero"] = size - want["random"] - want["text"]
    layout = [(k, n) for k in ("random", "text", "zero")
              for n in extents(rng, want[k], max(1, a.max_extent // UNIT))]
    rng.shuffle(layout)
    pool = paragraph_pool(random.Random(a.seed + 1)) if want["text"] else []
    rand = keystream(a.seed) if want["random"] else None
    with open(a.out, "wb") as f:
        f.truncate(a.size)
        off = 0
        for kind, n in layout:
            f.seek(off)
            if kind == "random":
                f.write(rand.stdout.read(n))
            elif kind == "text":
                parts, got = [], 0
                while got < n:
                    p = pool[rng.randrange(len(pool))]
                    parts.append(p)
                    got += len(p)
                f.write(b"".join(parts)[:n])
            off += n
    if rand:
        rand.kill()
    json.dump(want, sys.stdout)
    print()


if __name__ == "__main__":
    main()
