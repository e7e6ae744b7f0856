# Summarise stack_step1's trace (kernels/stack.cu; tags 100 + phase, P5 the LM head), written by `XLSTM_CUDA_TRACE=1 cuda_profile --trace FILE`:
# busy = items (start → end of items), waited = thread 0's waits for stages within it,
# span = the phase's first start → last end over blocks, after = end → the block's next phase start (barrier).
import csv, sys, statistics as st
from collections import defaultdict
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["tag"]) >= 100]
by_block = defaultdict(list)
for r in rows:
    by_block[int(r["block"])].append((int(r["t0"]), int(r["t1"]), int(r["t2"]), int(r["tag"]) - 100))
inst = defaultdict(list)  # (phase, occurrence) -> [(t0, t1)]
busy, waited, after = defaultdict(list), defaultdict(list), defaultdict(list)
for b, recs in by_block.items():
    recs.sort()
    count = defaultdict(int)
    for i, (t0, t1, w, ph) in enumerate(recs):
        busy[ph].append((t1 - t0) / 1e3); waited[ph].append(w / 1e3)
        if i + 1 < len(recs): after[ph].append((recs[i + 1][0] - t1) / 1e3)
        inst[(ph, count[ph])].append((t0, t1)); count[ph] += 1
span = defaultdict(list)
for (ph, k), v in inst.items():
    span[ph].append((max(t1 for _, t1 in v) - min(t0 for t0, _ in v)) / 1e3)
med = lambda v: st.median(v) if v else 0
print("phase  busy(med/max)   waited(med)  span(med)  after(med/max)  n")
for ph in sorted(busy):
    print(f"P{ph}  {med(busy[ph]):6.2f}/{max(busy[ph]):6.2f}  {med(waited[ph]):6.2f}  {med(span[ph]):6.2f}  {med(after[ph]):6.2f}/{max(after[ph]) if after[ph] else 0:6.2f}  {len(busy[ph])}")
allt = [t for recs in by_block.values() for r in recs for t in r[:2]]
# layer instances: P0 … P4 each (P5, the LM head after the last layer, is not a layer)
n_layers = sum(1 for (ph, _) in inst if ph == 0)
print(f"records {len(rows)}, wall {(max(allt) - min(allt)) / 1e3:.1f} us over {n_layers} layer instances (and {sum(1 for (ph, _) in inst if ph == 5)} heads): {(max(allt) - min(allt)) / 1e3 / n_layers:.2f} us a layer")
