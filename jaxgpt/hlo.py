"""What a compiled program's text says that its cost analysis does not: where the bytes go.

XLA's `cost_analysis()` gives one "bytes accessed" figure for a whole program, counts a loop
body once, and sees nothing inside a Pallas kernel (a `tpu_custom_call`). `bytes_by_source`
reads the optimized HLO text (`compiled.as_text()`) instead: every instruction that runs
(the entry computation, loop bodies, called computations; not the insides of fusions, which
stay on chip) is charged its result plus its operands, as XLA's own count does, and grouped by
where in the program it comes from: the jaxpr path XLA keeps in each instruction's metadata
(`jvp(GPT)/h_3/attn/dot_general` -> forward, `h_*/attn/dot_general`). Instructions inside the
gradient-accumulation loop (two nested scans in the training call) count once per micro-batch,
the rest once per step, so the figures are per optimizer step. It is a count of operands and
results, as XLA's is, not a trace: a fusion that reads a slice of a large operand is charged all
of it, so read it as "which parts of the program move the most data", and compare its total with
XLA's.
"""

import collections
import re

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# no data moves (aliases, control, bookkeeping), or the work is charged elsewhere (loop bodies,
# the -done half of an async pair)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "while", "call", "conditional", "opt-barrier",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
         "async-done", "send-done", "recv-done", "add-dependency", "domain", "slice-done",
         "reduce-scatter-done", "all-to-all-done"}
_ALIASES = {"custom-call:ConcatBitcast"}  # re-views adjacent buffers as one: no copy
_PARTIAL = re.compile(r"/(gather|dynamic_slice|slice)\"?$")  # the primitive reads a part
PALLAS = "tpu_custom_call"  # a Pallas TPU kernel: XLA's cost analysis does not look inside


def _array_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _ITEMSIZE[dtype]
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """'(bf16[2]{0}, f32[3]) fusion(...' -> (the result type, 'fusion(...')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operands(call: str) -> list[str]:
    """The operand names of 'opcode(%a, %b), attrs' (up to the matching parenthesis)."""
    start = call.find("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return _NAME.findall(call[start:i])
    return []


def parse(text: str) -> dict:
    """{computation: [(name, opcode, result bytes, operand names, op_name, called)]} and the
    entry's name, from compiled HLO text."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        type_text, call = _split_type(m.group(3))
        opcode = call.split("(", 1)[0].strip()
        target = re.search(r'custom_call_target="([^"]*)"', line)
        if target:  # custom-call:tpu_custom_call (a Pallas kernel), custom-call:ConcatBitcast
            opcode = f"{opcode}:{target.group(1)}"
        op_name = _OP_NAME.search(line)
        called = re.findall(r"(body|condition|to_apply|calls|branch_computations)=\{?%([\w.\-]+)",
                            line)
        comps[current].append((m.group(2), opcode, _array_bytes(type_text), _operands(call),
                               op_name.group(1) if op_name else "", called))
    return {"computations": comps, "entry": entry}


def _executed(parsed: dict) -> dict:
    """{computation: loop depth} of the computations that run as programs (the entry, loop
    bodies and conditions, called computations), not fusion bodies or reducers."""
    comps, depth = parsed["computations"], {parsed["entry"]: 0}
    todo = [parsed["entry"]]
    while todo:
        name = todo.pop()
        for _, opcode, _, _, _, called in comps.get(name, ()):
            for kind, target in called:
                if target not in comps or target in depth:
                    continue
                if opcode == "while" and kind in ("body", "condition"):
                    depth[target] = depth[name] + 1
                elif opcode in ("call", "conditional") or (opcode.startswith("async")
                                                           and kind == "calls"):
                    depth[target] = depth[name]
                else:
                    continue
                todo.append(target)
    return depth


def custom_calls(text: str) -> int:
    """How many Pallas kernels (tpu_custom_call) the compiled program holds."""
    return text.count(f'custom_call_target="{PALLAS}"')


def label(op_name: str) -> tuple[str, str]:
    """(pass, source) of an instruction's jaxpr path: forward / backward / step, and the model
    path with layers merged (h_*) and the primitive, e.g. ('backward', 'h_*/attn/dot_general')."""
    if not op_name:
        return "other", "(no source: XLA's own copies and layout changes)"
    phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name
             else "step")
    inside = re.split(r"GPT\)+/", op_name, maxsplit=1)  # jvp(GPT)/... or transpose(jvp(GPT))/...
    path = inside[-1]
    parts = [re.sub(r"^h_\d+$", "h_*", p) for p in path.split("/")]
    parts = [p for p in parts if p not in ("while", "body", "eval_jaxpr", "cond", "branch")
             and not p.startswith("jit(") and not p.startswith("checkpoint")]
    if len(inside) == 1:
        parts = parts[-2:]  # the loss, the optimizer, the batch: the last two names say enough
    return phase, "/".join(parts[:4] + parts[-1:] if len(parts) > 5 else parts)


def category(phase: str, source: str) -> str:
    """A coarse name for a source: attention (the core: scores, softmax, kernel), its q/k/v
    and output projections, the MLP, LayerNorms, embeddings and logits, the update, other."""
    if phase == "kernel":
        return "attention core"
    if phase == "step":
        return "optimizer update and step"
    if phase == "micro":
        return "gradient accumulation"
    if "/attn/" in source or source.startswith("h_*/attn"):
        if "c_attn" in source or "c_proj" in source:
            return "attention projections"
        return "attention core"
    if "/mlp/" in source:
        return "MLP"
    if "ln_" in source:
        return "LayerNorm"
    if source.startswith(("wte", "wpe", "lm_head")) or "softmax_cross" in source or \
            "take_along_axis" in source or "log_softmax" in source:
        return "embeddings, logits and loss"
    return "other"


def bytes_by_source(text: str, accumulation: int = 1, top: int = 12) -> dict:
    """Per optimizer step: {"total", "once" (every instruction counted once, as XLA's cost
    analysis counts a loop body), "partial_reads", "by_category": {name: bytes}, "top":
    [(pass, source, bytes)]}: operand + result bytes of every executed instruction, grouped by
    source; those nested two scans deep (the micro-batch loop inside the steps loop) count
    `accumulation` times. `partial_reads`: the part of the total that gathers and slices are
    charged for operand bytes they do not read (in the total, as in XLA's count)."""
    parsed = parse(text)
    depth = _executed(parsed)
    comps = parsed["computations"]
    sources, categories, total, partial, once = (collections.Counter(), collections.Counter(),
                                                 0, 0, 0)
    for comp, d in depth.items():
        sizes = {name: size for name, _, size, _, _, _ in comps[comp]}
        names = {}  # instruction -> op_name; XLA's own (async copies, slices) take their input's
        for name, opcode, size, operands, op_name, _ in comps[comp]:
            op_name = op_name or next((names[o] for o in operands if names.get(o)), "")
            names[name] = op_name
            if opcode in _FREE or opcode in _ALIASES:
                continue
            read = sum(sizes.get(o, 0) for o in operands)
            # an async op's result holds its operands too, (source, destination, context):
            # what it writes is the rest, read once and written once
            moved = 2 * (size - read) if opcode.endswith("-start") else size + read
            if _PARTIAL.search(op_name) and opcode.startswith("fusion"):
                # a gather or slice reads only what it returns: the rest of its operand is a
                # count artefact (XLA's count charges all of it)
                partial += (moved - 2 * size) * (accumulation if accumulation > 1 and
                                                 (op_name.count("while/body") >= 2) else 1)
            nested = op_name.count("while/body") if op_name else d
            once += moved
            moved *= accumulation if accumulation > 1 and nested >= 2 else 1
            phase, source = label(op_name)
            if phase == "step" and nested >= 2:  # in the micro-batch loop: the gradient sum
                phase = "micro"
            if opcode == f"custom-call:{PALLAS}":  # named after the kernel (splash_mha_fwd...)
                phase, source = "kernel", "splash attention " + name.split(".")[0]
            sources[(phase, source)] += moved
            categories[category(phase, source)] += moved
            total += moved
    return {"total": total, "once": once, "partial_reads": partial,
            "by_category": dict(categories.most_common()),
            "top": [(p, s, b) for (p, s), b in sources.most_common(top)]}
