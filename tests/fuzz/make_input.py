#!/usr/bin/env python3
"""Makes the input of one fuzz case from a setup recipe of tests/fuzz/cases.tsv, in the case's
directory (the current one), and prints its path (the case's {bad}). Deterministic: the same recipe
gives the same bytes from the same fixtures.

  SRC:OP[,OP...]   a copy of a fixture file, changed by each OP in turn. SRC is one of
                   model pmodel dmodel tsmodel ts rts csv digits classifier (copied to bad/NAME.EXT),
                   or ckpt resolved (runs/paused/checkpoint.pt or config.resolved.json, changed in place).
                   OP: trunc=P (keep the first P bytes), flip=P (xor the byte at P with 0xff), bit=P (xor
                   with 0x01), zero=P+L (L zero bytes from P), append=N / prepend=N (N pseudo-random
                   bytes), text, empty, dir (a directory instead), as=SRC (the bytes of another fixture),
                   write=TEXT, gunzip, gzip. A position P is a byte offset, from the end if negative, or a
                   fraction of the size if it has a '.' ("half" is 0.5).
  gen:KIND=N       a generated file: nest_toml, nest_json (finetune.hidden nested N deep in fx/ft.toml),
                   nest_json_top (a JSON document of N nested arrays), nest_value (N nested arrays, for
                   --set), long_key, many_keys, long_string (in [finetune]), csv_wide (one row of N
                   values), csv_long_number (a number of N digits).
Usage: make_input.py RECIPE NAME
"""
import gzip
import json
import os
import random
import shutil
import sys

SOURCES = {
    "model": "fx/model.pt",
    "pmodel": "fx/pmodel.pt",
    "dmodel": "fx/dmodel.pt",
    "tsmodel": "fx/tsmodel.pt",
    "ts": "fx/base.ts",
    "rts": "fx/reward_ok.ts",
    "csv": "fx/samples.csv",
    "digits": "fx/digits.csv.gz",
    "classifier": "fx/classifier.pt",
    "ckpt": "runs/paused/checkpoint.pt",
    "resolved": "runs/paused/config.resolved.json",
}
IN_PLACE = {"ckpt", "resolved"}


def position(text, size):
    if text == "half":
        return size // 2
    if "." in text:
        return int(float(text) * size)
    p = int(text)
    return size + p if p < 0 else p


def ext_of(path):
    base = os.path.basename(path)
    return base[base.index("."):] if "." in base else ""


def apply(data, op, arg, rng, path):
    """Returns the new bytes, or None when the file became a directory."""
    size = len(data)
    if op == "trunc":
        return data[: position(arg, size)]
    if op in ("flip", "bit"):
        p = position(arg, size)
        b = bytearray(data)
        b[p] ^= 0xFF if op == "flip" else 0x01
        return bytes(b)
    if op == "zero":
        start, length = arg.split("+")
        p = position(start, size)
        b = bytearray(data)
        b[p:p + int(length)] = bytes(min(int(length), max(0, size - p)))
        return bytes(b)
    if op == "append":
        return data + bytes(rng.randrange(256) for _ in range(int(arg)))
    if op == "prepend":
        return bytes(rng.randrange(256) for _ in range(int(arg))) + data
    if op == "text":
        return b"this is not what tilt expects here: it is a line of text\n"
    if op == "empty":
        return b""
    if op == "dir":
        return None
    if op == "as":
        with open(SOURCES[arg], "rb") as f:
            return f.read()
    if op == "write":
        return arg.encode()
    if op == "gunzip":
        return gzip.decompress(data)
    if op == "gzip":
        return gzip.compress(data, mtime=0)
    raise SystemExit(f"make_input.py: unknown operation '{op}' in {path}")


def generate(kind, n, name):
    with open("fx/ft.toml") as f:
        ft = f.read()
    nested = "[" * n + "8" + "]" * n
    if kind == "nest_toml":
        return ".toml", ft.replace("hidden = [8]", "hidden = " + nested)
    if kind == "nest_json":
        text = json.dumps({"seed": 1, "threads": 1, "data": {"type": "ring", "components": 4},
                           "base": {"type": "exact"}, "reward": {"type": "quadratic", "center": [2.0, 0.0]},
                           "finetune": {"hidden": "NESTED", "iterations": 1}})
        return ".json", text.replace('"NESTED"', nested)
    if kind == "nest_json_top":
        return ".json", "[" * n + "]" * n
    if kind == "nest_value":
        return ".txt", nested
    if kind == "long_key":
        return ".toml", ft + "k" * n + " = 1\n"
    if kind == "many_keys":
        return ".toml", ft + "".join(f"k{i:06d} = 1\n" for i in range(n))
    if kind == "long_string":
        return ".toml", ft.replace("lr = 0.001", 'lr = "' + "a" * n + '"')
    if kind == "csv_wide":
        return ".csv", "x0\n" + ",".join(["1.0"] * n) + "\n"
    if kind == "csv_long_number":
        return ".csv", "x0,x1\n" + "1" * n + ",0.0\n"
    raise SystemExit(f"make_input.py: unknown generator '{kind}' for {name}")


def main():
    recipe, name = sys.argv[1], sys.argv[2]
    os.makedirs("bad", exist_ok=True)
    src, _, ops = recipe.partition(":")
    if src == "gen":
        kind, _, n = ops.partition("=")
        ext, text = generate(kind, int(n), name)
        out = f"bad/{name}{ext}"
        with open(out, "w") as f:
            f.write(text)
        print(out)
        return
    if src not in SOURCES:
        raise SystemExit(f"make_input.py: unknown source '{src}' in '{recipe}'")
    out = SOURCES[src] if src in IN_PLACE else f"bad/{name}{ext_of(SOURCES[src])}"
    with open(SOURCES[src], "rb") as f:
        data = f.read()
    rng = random.Random(name)
    for step in ops.split(","):
        op, _, arg = step.partition("=")
        data = apply(data, op, arg, rng, recipe)
        if data is None:
            break
    if os.path.isdir(out):
        shutil.rmtree(out)
    elif os.path.exists(out):
        os.remove(out)
    if data is None:
        os.makedirs(out)
    else:
        with open(out, "wb") as f:
            f.write(data)
    print(out)


if __name__ == "__main__":
    main()
