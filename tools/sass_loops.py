#!/usr/bin/env python3
"""The K loops of the kernels in a `cuobjdump -sass` listing: for each kernel, each innermost loop
that holds tensor-core instructions (HMMA: mma.sync; HGMMA: wgmma), its instruction count per K
step (the pipelined _vec / _wgmma kernels run one block barrier a step, so a loop the compiler
unrolled is counted per barrier; the general kernels run two a step) and the kinds that fill it.
A CPU-side proxy for a kernel's issue cost per K step: a warp scheduler issues one instruction a
cycle, so a loop's instructions beside its MMAs compete with the MMAs for the scheduler (see
tools/sass_report.sh).

    tools/sass_loops.py LISTING.sass [KERNEL-SUBSTRING ...]
"""
import re
import sys

MMA = re.compile(r"\bH(G)?MMA")


def kernels(text):
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return zip(parts[1::2], parts[2::2])


def instructions(body):
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]


def opcode(text):
    return re.sub(r"^@!?U?P[T0-9] ", "", text).split()[0].split(".")[0]


def mma_loops(ins):
    """(start, end) index pairs of the loops (backward branches) holding an MMA, innermost only."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], i))
    has_mma = [(s, e) for s, e in loops if any(MMA.search(t) for _, t in ins[s : e + 1])]
    return [
        (s, e)
        for s, e in has_mma
        if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in has_mma)
    ]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    wanted = sys.argv[2:]
    for name, body in kernels(open(sys.argv[1]).read()):
        if wanted and not any(w in name for w in wanted):
            continue
        ins = instructions(body)
        for s, e in mma_loops(ins):
            kinds = {}
            for _, text in ins[s : e + 1]:
                kinds[opcode(text)] = kinds.get(opcode(text), 0) + 1
            mma = kinds.get("HMMA", 0) + kinds.get("HGMMA", 0)
            # The pipelines run one block barrier a K step: a loop the compiler unrolled holds several.
            steps = max(1, kinds.get("BAR", 0))
            top = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:10])
            per = f"{(e - s + 1) / steps:.0f} instructions a K step, {mma // steps} MMA"
            unrolled = f" (a loop of {steps} steps, {e - s + 1} instructions)" if steps > 1 else ""
            print(f"{name}: {per}{unrolled} ({top})")


if __name__ == "__main__":
    main()
