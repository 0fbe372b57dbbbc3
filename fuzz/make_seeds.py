#!/usr/bin/env python3
"""Write small valid GGUF files as the seed corpus of the `gguf_reader` fuzz target.

Usage: python3 fuzz/make_seeds.py [OUT_DIR]   (default: fuzz/corpus/gguf_reader)
       python3 fuzz/make_seeds.py --regressions [OUT_DIR]   (default: tests/data/fuzz/gguf)
           writes the hand-made hostile cases (hostile_*.gguf) and a few seeds (seed_*.gguf)
           that the regression test crates/bitnet-formats/tests/fuzz_regressions.rs reads.

No packages needed. Layout (REFERENCE.md section 2, GGUF v3, little-endian): magic "GGUF",
u32 version, u64 n_tensors, u64 n_kv; kv pairs (u64-length key, u32 value type, value); tensor
infos (name, u32 n_dims, u64 dims innermost first, u32 ggml type, u64 offset relative to the
data section); zero padding to the alignment; the data, each tensor aligned.
The output is deterministic, so rerunning it rewrites the same files.
"""

import os
import random
import struct
import sys

# Metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
              BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}

# ggml tensor types: id, (elements per block, bytes per block).
T_F32, T_F16, T_Q8_0, T_Q6_K, T_BF16, T_TQ1_0, T_TQ2_0, T_I2_S = 0, 1, 8, 14, 30, 34, 35, 36


def gguf_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(ty, v):
    """Encode a value of metadata type `ty`. Arrays are (elem_type, [values])."""
    if ty == STR:
        return gguf_str(v)
    if ty == ARR:
        elem_ty, items = v
        return struct.pack("<IQ", elem_ty, len(items)) + b"".join(value(elem_ty, x) for x in items)
    return struct.pack(SCALAR_FMT[ty], v)


def align_up(x, a):
    return (x + a - 1) // a * a


def gguf(kvs, tensors, version=3, alignment=32):
    """kvs: [(key, type, value)]; tensors: [(name, dims, ggml type, data bytes)]."""
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, ty, v in kvs:
        out += gguf_str(key) + struct.pack("<I", ty) + value(ty, v)
    rel, offsets = 0, []
    for name, dims, ty, data in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, rel)
        offsets.append(rel)
        rel = align_up(rel + len(data), alignment)
    data_start = align_up(len(out), alignment)
    out += bytes(data_start - len(out))
    for (_, _, _, data), off in zip(tensors, offsets):
        out += bytes(data_start + off - len(out))
        out += data
    out += bytes(align_up(len(out), alignment) - len(out))
    return bytes(out)


# --- tensor data encoders -------------------------------------------------------------------

def f32_data(vals):
    return b"".join(struct.pack("<f", v) for v in vals)


def f16_data(vals):
    return b"".join(struct.pack("<e", v) for v in vals)


def bf16_data(vals):
    return b"".join(struct.pack("<f", v)[2:] for v in vals)


def q8_0_data(rng, n):
    out = b""
    for _ in range(n // 32):
        out += struct.pack("<e", 0.01) + bytes(rng.randrange(256) for _ in range(32))
    return out


def q6_k_data(rng, n):
    out = b""
    for _ in range(n // 256):
        ql = bytes(rng.randrange(256) for _ in range(128))
        qh = bytes(rng.randrange(256) for _ in range(64))
        sc = bytes(rng.randrange(256) for _ in range(16))
        out += ql + qh + sc + struct.pack("<e", 0.002)
    return out


def ternary(rng, n):
    return [rng.randrange(3) for _ in range(n)]  # codes: value + 1


def tq2_0_data(codes, d=0.5):
    out = b""
    for b0 in range(0, len(codes), 256):
        qs = bytearray(64)
        for e in range(256):
            qs[(e // 128) * 32 + e % 32] |= codes[b0 + e] << (2 * ((e % 128) // 32))
        out += bytes(qs) + struct.pack("<e", d)
    return out


def tq1_0_data(codes, d=0.5):
    def pack(trits):
        q = 0
        for t in trits:
            q = q * 3 + t
        q *= 3 ** (5 - len(trits))
        return (q * 256 + 242) // 243

    out = b""
    for b0 in range(0, len(codes), 256):
        t = codes[b0:b0 + 256]
        blk = bytearray(54)
        for m in range(32):
            blk[m] = pack([t[n * 32 + m] for n in range(5)])
        for m in range(16):
            blk[32 + m] = pack([t[160 + n * 16 + m] for n in range(5)])
        for j in range(4):
            blk[48 + j] = pack([t[240 + n * 4 + j] for n in range(4)])
        blk[52:54] = struct.pack("<e", d)
        out += bytes(blk)
    return out


def i2_s_data(codes, scale=0.25):
    n = len(codes)
    out = bytearray(n // 4 + 32)
    for e, c in enumerate(codes):
        blk, j = divmod(e, 128)
        out[blk * 32 + j % 32] |= c << (6 - 2 * (j // 32))
    out[n // 4:n // 4 + 4] = struct.pack("<f", scale)
    return bytes(out)


# --- the seeds ------------------------------------------------------------------------------

def every_value_type():
    return [
        ("general.architecture", STR, "bitnet-b1.58"),
        ("a.u8", U8, 7), ("a.i8", I8, -7), ("a.u16", U16, 700), ("a.i16", I16, -700),
        ("a.u32", U32, 70000), ("a.i32", I32, -70000), ("a.f32", F32, 0.5),
        ("a.bool", BOOL, True), ("a.str", STR, "h\u00e9llo\nworld"), ("a.u64", U64, 1 << 40),
        ("a.i64", I64, -(1 << 40)), ("a.f64", F64, 0.25),
        ("a.empty", ARR, (U8, [])),
        ("a.arr.u8", ARR, (U8, [1, 2, 3])), ("a.arr.i8", ARR, (I8, [-1, 2])),
        ("a.arr.u16", ARR, (U16, [1, 65535])), ("a.arr.i16", ARR, (I16, [-2, 3])),
        ("a.arr.u32", ARR, (U32, [5])), ("a.arr.i32", ARR, (I32, [-5, 6])),
        ("a.arr.f32", ARR, (F32, [0.0, -1.5])), ("a.arr.bool", ARR, (BOOL, [False, True])),
        ("a.arr.str", ARR, (STR, ["x", "", "yz"])), ("a.arr.u64", ARR, (U64, [1 << 63])),
        ("a.arr.i64", ARR, (I64, [-1])), ("a.arr.f64", ARR, (F64, [1e300])),
        ("a.nested", ARR, (ARR, [(I32, [1, 2]), (STR, ["a"]), (ARR, [(U8, [9])])])),
    ]


def seeds():
    rng = random.Random(1234)
    tern = lambda n: ternary(rng, n)  # noqa: E731
    all_tensors = [
        ("t.f32", [4, 2], T_F32, f32_data([0.5 * i for i in range(8)])),
        ("t.f16", [8, 2], T_F16, f16_data([0.25 * i - 1 for i in range(16)])),
        ("t.bf16", [4], T_BF16, bf16_data([1.0, -2.0, 3.5, 0.0])),
        ("t.q8_0", [32, 2], T_Q8_0, q8_0_data(rng, 64)),
        ("t.q6_k", [256], T_Q6_K, q6_k_data(rng, 256)),
        ("t.tq1_0", [256, 1], T_TQ1_0, tq1_0_data(tern(256))),
        ("t.tq2_0", [256, 2], T_TQ2_0, tq2_0_data(tern(512))),
        ("t.i2_s", [128, 2], T_I2_S, i2_s_data(tern(256))),
    ]
    yield "every_value_type.gguf", gguf(every_value_type(), [])
    yield "every_tensor_type.gguf", gguf([("general.architecture", STR, "bitnet")], all_tensors)
    yield "empty_v3.gguf", gguf([], [])
    yield "empty_v2.gguf", gguf([], [], version=2)
    # One small file per tensor type, so mutations of each reach its decoder quickly.
    for t in all_tensors:
        yield "one_%s.gguf" % t[0][2:], gguf([], [t])
    yield "alignment_64.gguf", gguf(
        [("general.alignment", U32, 64)],
        [("a", [4], T_F32, f32_data([1, 2, 3, 4])), ("b", [2], T_F16, f16_data([1, 2]))],
        alignment=64)
    yield "alignment_1_u64.gguf", gguf(
        [("general.alignment", U64, 1)],
        [("a", [3], T_F16, f16_data([1, 2, 3])), ("b", [1], T_F32, f32_data([5]))],
        alignment=1)
    # I2_S rows of 192 elements: 128-element blocks run across rows.
    yield "i2_s_odd_rows.gguf", gguf([], [("blk.0.attn_q.weight", [192, 2], T_I2_S,
                                           i2_s_data(tern(384)))])
    yield "dims_4.gguf", gguf([], [("t4", [2, 1, 2, 1], T_F32, f32_data([1, 2, 3, 4]))])
    yield "tokenizer_like.gguf", gguf([
        ("general.architecture", STR, "bitnet"),
        ("bitnet.block_count", U32, 1),
        ("bitnet.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.tokens", ARR, (STR, ["<s>", "</s>", "a", "b", "ab", "\u0120x"])),
        ("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 1, 1, 1, 1])),
        ("tokenizer.ggml.scores", ARR, (F32, [0, 0, -1, -2, -3, -4])),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b"])),
        ("tokenizer.ggml.bos_token_id", U32, 0),
        ("tokenizer.chat_template", STR, "{{ messages }}"),
    ], [("token_embd.weight", [8, 6], T_F16, f16_data([0.125] * 48))])


def hostile():
    """Hand-made hostile files, each with one defect. The regression test
    (crates/bitnet-formats/tests/fuzz_regressions.rs) knows the error each must give."""
    header = lambda n_t, n_kv: b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv)  # noqa: E731
    kv = lambda k, ty, v: gguf_str(k) + struct.pack("<I", ty) + value(ty, v)  # noqa: E731

    def tinfo(name, dims, ty, rel):
        return (gguf_str(name) + struct.pack("<I", len(dims))
                + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, rel))

    def pad(b, data=b"", a=32):
        return b + bytes(align_up(len(b), a) - len(b)) + data

    f32x4 = f32_data([1, 2, 3, 4])
    yield "huge_tensor_count", header(2**64 - 1, 0) + bytes(64)
    yield "huge_kv_count", header(0, 2**62) + bytes(64)
    # A key whose length is far beyond the file.
    yield "huge_string_length", header(0, 1) + struct.pack("<Q", 2**63) + b"abc" + bytes(32)
    yield "huge_array_count", header(0, 1) + gguf_str("a.big") + struct.pack("<IIQ", ARR, U64,
                                                                              2**60) + bytes(64)
    # Six arrays nested in one another (the reader allows four levels).
    nested = (U8, [1])
    for _ in range(6):
        nested = (ARR, [nested])
    yield "nested_arrays_too_deep", header(0, 1) + kv("a.deep", ARR, nested)
    yield "dims_overflow_u64", pad(header(1, 0) + tinfo("t.over", [2**32, 2**32, 2], T_F32, 0),
                                   f32x4)
    yield "dims_too_many_elements", pad(header(1, 0) + tinfo("t.big", [2**20, 2**20], T_F16, 0),
                                        f32x4)
    yield "zero_dimension", pad(header(1, 0) + tinfo("t.zero", [4, 0], T_F32, 0), f32x4)
    yield "five_dims", pad(header(1, 0) + tinfo("t.five", [1, 1, 1, 1, 1], T_F32, 0), f32x4)
    yield "offset_past_end", pad(header(1, 0) + tinfo("t.far", [4], T_F32, 1 << 20), f32x4)
    yield "offset_overflows", pad(header(1, 0) + tinfo("t.wrap", [4], T_F32, 2**64 - 32), f32x4)
    yield "offset_misaligned", pad(header(1, 0) + tinfo("t.odd", [4], T_F32, 4), f32x4 * 2)
    yield "data_truncated", header(1, 0) + tinfo("t.short", [64], T_F32, 0) + bytes(40)
    yield "unknown_tensor_type", pad(header(1, 0) + tinfo("t.q4", [32], 2, 0), bytes(32))
    yield "unknown_tensor_type_id", pad(header(1, 0) + tinfo("t.what", [4], 1000, 0), f32x4)
    yield "unknown_value_type", header(0, 1) + gguf_str("a.t13") + struct.pack("<IQ", 13, 0)
    yield "unknown_array_type", header(0, 1) + gguf_str("a.arr") + struct.pack("<IIQ", ARR, 99,
                                                                               1)
    yield "alignment_not_power_of_two", pad(
        header(1, 1) + kv("general.alignment", U32, 48) + tinfo("a", [4], T_F32, 0), f32x4)
    yield "alignment_zero", pad(header(0, 1) + kv("general.alignment", U64, 0))
    yield "alignment_string", pad(header(0, 1) + kv("general.alignment", STR, "32"))
    yield "bad_bool", header(0, 1) + gguf_str("a.bool") + struct.pack("<IB", BOOL, 2)
    yield "bad_utf8_key", header(0, 1) + gguf_str(b"a.\xff\xfe") + struct.pack("<IB", U8, 1)
    yield "duplicate_key", header(0, 2) + kv("a.x", U8, 1) + kv("a.x", U8, 2)
    yield "duplicate_tensor", pad(header(2, 0) + tinfo("t.dup", [4], T_F32, 0)
                                  + tinfo("t.dup", [4], T_F32, 0), f32x4)
    yield "q8_0_row_not_block_multiple", pad(header(1, 0) + tinfo("t.q8", [33], T_Q8_0, 0),
                                             bytes(68))
    yield "i2_s_not_multiple_of_128", pad(header(1, 0) + tinfo("t.i2", [100], T_I2_S, 0),
                                          bytes(64))
    yield "truncated_metadata", gguf(every_value_type(), [])[:500]
    yield "bad_magic", b"GGML" + struct.pack("<IQQ", 3, 0, 0)
    yield "bad_version", b"GGUF" + struct.pack("<IQQ", 4, 0, 0)
    # Parses, but the I2_S data holds the invalid code 3 (the decoder must refuse it).
    codes = [1] * 128
    codes[5] = 3
    yield "i2_s_code_3", gguf([], [("t.i2s", [128], T_I2_S, i2_s_data(codes))])


def write(out_dir, files):
    os.makedirs(out_dir, exist_ok=True)
    for name, data in files:
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        print("%6d  %s" % (len(data), name))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = sys.argv[1:]
    if args[:1] == ["--regressions"]:
        # The committed regression cases: hostile files and a few seeds.
        out_dir = args[1] if len(args) > 1 else os.path.join(here, "..", "tests", "data", "fuzz",
                                                               "gguf")
        keep = {"every_value_type.gguf", "every_tensor_type.gguf", "i2_s_odd_rows.gguf",
                "alignment_1_u64.gguf", "tokenizer_like.gguf"}
        write(out_dir, [("hostile_%s.gguf" % n, d) for n, d in hostile()]
              + [("seed_" + n, d) for n, d in seeds() if n in keep])
        return
    out_dir = args[0] if args else os.path.join(here, "corpus", "gguf_reader")
    write(out_dir, seeds())


if __name__ == "__main__":
    main()
