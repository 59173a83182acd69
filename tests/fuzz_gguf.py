"""Deterministic GGUF fuzzing for tests/test_fuzz.py: the byte layout of an intact file (from
gguf.GGUFReader, independent of our parser), mutations of its header, metadata and tensor infos, and a
runner that executes cases in child processes (tests/fuzz_child.py) so a crash or a hang is observed
instead of taking the test session down.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "fuzz_child.py"


@dataclass
class Part:
    start: int
    nbytes: int
    role: str            # count, strlen, arraylen, vtype, itype, ndims, dim, ttype, toffset, bytes, value
    label: str           # e.g. "kv llama.block_count value", "ti blk.0.attn_q.weight offset"
    dtype: str = ""      # numpy dtype of the part's elements


@dataclass
class Layout:
    size: int
    parts: list = field(default_factory=list)
    kv_starts: list = field(default_factory=list)        # (start, key)
    ti_starts: list = field(default_factory=list)        # (start, tensor name)
    kv_region: tuple = (0, 0)
    ti_region: tuple = (0, 0)
    data_start: int = 0
    tensor_data: list = field(default_factory=list)      # (name, start, nbytes)
    kv_values: dict = field(default_factory=dict)        # key -> value Parts (scalars or array elements)

    def find(self, role=None, label=None):
        return [p for p in self.parts if (role is None or p.role == role) and (label is None or label in p.label)]


def layout(path) -> Layout:
    """Every header field, key/value and tensor-info part of an intact GGUF, with its byte range."""
    r = gguf.GGUFReader(path)
    lay = Layout(size=os.path.getsize(path))
    lay.parts += [Part(0, 4, "bytes", "magic"), Part(4, 4, "value", "version", "uint32"),
                  Part(8, 8, "count", "n_tensors", "uint64"), Part(16, 8, "count", "n_kv", "uint64")]
    kv_end = 24
    for key, fld in r.fields.items():
        if key.startswith("GGUF."):
            continue
        pos = fld.offset
        lay.kv_starts.append((pos, key))
        roles = ["strlen", "bytes", "vtype"]
        if fld.types[0] == gguf.GGUFValueType.STRING:
            roles += ["strlen", "bytes"]
        elif fld.types[0] == gguf.GGUFValueType.ARRAY:
            roles += ["itype", "arraylen"]
            elem = ["strlen", "bytes"] if fld.types[-1] == gguf.GGUFValueType.STRING else ["value"]
            roles += elem * ((len(fld.parts) - 5) // len(elem))
        else:
            roles += ["value"]
        values = []
        for i, (part, role) in enumerate(zip(fld.parts, roles)):
            p = Part(pos, part.nbytes, role, f"kv {key} {role}{'' if i < 5 else f' {i - 5}'}", str(part.dtype))
            lay.parts.append(p)
            if role == "value" or (role == "strlen" and i >= 3):
                values.append(p)
            pos += part.nbytes
        lay.kv_values[key] = values
        kv_end = pos
    lay.kv_region = (24, kv_end)
    for t in r.tensors:
        pos = t.field.offset
        lay.ti_starts.append((pos, t.name))
        for part, role in zip(t.field.parts, ["strlen", "bytes", "ndims", "dim", "ttype", "toffset"]):
            if role == "dim":
                for j in range(len(part)):
                    lay.parts.append(Part(pos + 8 * j, 8, "dim", f"ti {t.name} dim{j}", "uint64"))
            else:
                lay.parts.append(Part(pos, part.nbytes, role, f"ti {t.name} {role}", str(part.dtype)))
            pos += part.nbytes
        lay.tensor_data.append((t.name, int(t.data_offset), int(t.n_bytes)))
    lay.ti_region = (kv_end, pos)
    lay.data_start = min(s for _, s, _ in lay.tensor_data)
    return lay


# ---- mutations ----------------------------------------------------------------------------------

def put_uint(buf: bytearray, part: Part, value: int) -> None:
    """Overwrite an unsigned integer part (4 or 8 bytes) with value (taken modulo its width)."""
    code = {4: "<I", 8: "<Q", 1: "<B", 2: "<H"}[part.nbytes]
    struct.pack_into(code, buf, part.start, value % (1 << (8 * part.nbytes)))


def flip_bit(buf: bytearray, bit: int) -> None:
    buf[bit // 8] ^= 1 << (bit % 8)


@dataclass
class Case:
    id: str
    kind: str
    data: bytes
    action: str = "load"          # "parse" or "load"
    expect_error: bool = True     # False: a random bit flip may leave a valid file (then it must run)
    load_kw: dict = field(default_factory=dict)


# ---- running ------------------------------------------------------------------------------------

def run_cases(cases, workdir: Path, warmup_paths, per_case_timeout: int = 10, env=None):
    """Write each case's file, run them in child processes; returns {id: result dict}.

    A child that dies or stops answering leaves its running case marked "crash:<rc>" or "hang", and a
    new child continues with the next case."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = [{"id": str(p), "path": str(p), "action": a, "warmup": True, "load_kw": kw}
            for p, a, kw in warmup_paths]
    for c in cases:
        path = workdir / f"{c.id}.gguf"
        path.write_bytes(c.data)
        spec.append({"id": c.id, "path": str(path), "action": c.action, "timeout": per_case_timeout,
                     "load_kw": c.load_kw})
    cases_file, results_file = workdir / "cases.json", workdir / "results.jsonl"
    cases_file.write_text(json.dumps(spec))
    results_file.write_text("")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    results, index = {}, {s["id"]: i for i, s in enumerate(spec)}
    first = len(warmup_paths)
    while first < len(spec):
        n_left = len(spec) - first
        try:
            proc = subprocess.run([sys.executable, str(CHILD), str(cases_file), str(results_file), str(first)],
                                  capture_output=True, text=True, env=env,
                                  timeout=60 + per_case_timeout * n_left)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = "hang", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
                else (e.stderr or "")
        running = None
        for line in results_file.read_text().splitlines():
            rec = json.loads(line)
            if "start" in rec:
                running = rec["start"]
            else:
                results[rec["id"]] = rec
                running = None
        if running is None and rc == 0:
            break
        if running is None:  # died before any case (import error, ...): report it on every case left
            for s in spec[first:]:
                results.setdefault(s["id"], {"id": s["id"], "outcome": f"crash:{rc}", "message": stderr[-2000:]})
            break
        results[running] = {"id": running, "outcome": "hang" if rc == "hang" else f"crash:{rc}",
                            "message": stderr[-2000:]}
        with open(results_file, "a") as fh:
            fh.write(json.dumps(results[running]) + "\n")
        first = index[running] + 1
    return results


def summarize(cases, results):
    """{kind: {outcome: count}}"""
    table: dict = {}
    for c in cases:
        o = results.get(c.id, {}).get("outcome", "missing")
        o = o if not o.startswith("gguf:") else o
        table.setdefault(c.kind, {}).setdefault(o, 0)
        table[c.kind][o] += 1
    return table


def bad_results(cases, results, alloc_limit: int):
    """Cases that did not end as they must: a gguf_flash error (or, for a flip that may leave a valid
    file, a clean run), promptly, without allocating more than alloc_limit bytes. Promptly: within 5 s
    besides a first-run compile of a type set the warm-up did not have (a valid file of new types; the
    compile runs in its own child and the case's alarm still bounds it)."""
    bad = []
    for c in cases:
        r = results.get(c.id, {"outcome": "missing", "message": ""})
        ok = r["outcome"].startswith("gguf:") or (r["outcome"] == "ok" and not c.expect_error)
        if not ok or r.get("peak", 0) > alloc_limit or r.get("seconds", 0) - r.get("compile_seconds", 0) > 5:
            bad.append((c.id, r["outcome"], r.get("peak"), round(r.get("seconds", 0), 2), r["message"][:600]))
    return bad


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def rewrite(src, dst, meta=None, tensors=None, drop=()):
    """Copy the GGUF `src` to `dst` with metadata overrides or additions {key: (value, GGUFValueType, sub
    type)} (an added key must be a scalar), keys and tensors in `drop` left out, and tensor replacements
    or additions {name: (numpy array, raw ggml type or None)} (added after the source's tensors): files
    that are well-formed GGUFs but disagree with themselves."""
    from gguf_flash.gguf_file import GGUFFile
    meta, tensors = meta or {}, tensors or {}
    f = GGUFFile(src)
    w = gguf.GGUFWriter(dst, f.arch)
    w.add_custom_alignment(f.alignment)
    for key, value in f.meta.items():
        if key in ("general.architecture", "general.alignment") or key in drop:
            continue
        vtype, itype = f.meta_types[key]
        if key in meta:
            value, vtype, itype = meta[key]
        vtype = gguf.GGUFValueType(vtype)
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, [x.item() if hasattr(x, "item") else x for x in value], vtype,
                            sub_type=gguf.GGUFValueType(itype))
        else:
            w.add_key_value(key, value, vtype)
    for key, (value, vtype, itype) in meta.items():   # keys the source does not have
        if key not in f.meta:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))
    for name, info in f.tensors.items():
        if name in drop:
            continue
        if name in tensors:
            arr, raw_type = tensors[name]
            if raw_type is None:
                w.add_tensor(name, arr)
            else:
                w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType(raw_type))
        elif info.qtype in (0, 1, 26):  # F32, F16, I32
            w.add_tensor(name, np.array(f.array(name)))
        else:
            w.add_tensor(name, np.array(f.raw(name)), raw_dtype=gguf.GGMLQuantizationType(info.qtype))
    for name, (arr, raw_type) in tensors.items():   # tensors the source does not have
        if name not in f.tensors:
            w.add_tensor(name, arr, raw_dtype=None if raw_type is None else gguf.GGMLQuantizationType(raw_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f.close()
    return Path(dst)
