#!/usr/bin/env bash
# `xlstm bench` and the peer (bench/peer.py) in one call on one GPU, as BENCHMARKS.md records them:
# xLSTM-7B shape, random bf16 weights; decode at batch 1, 16, 64; prefill of 2,048 and 8,192 tokens
# back to back and from an idle GPU (1 s rest before each timed prefill). Prints a JSON line per
# measurement, then a table of ours against the peer.
#
#   bench/side_by_side.sh [XLSTM_BIN] [WHEELS_DIR]
#
# XLSTM_BIN: the engine (default: target/release/xlstm, else `xlstm` on PATH). WHEELS_DIR: where the
# `xlstm` and `mlstm_kernels` wheels lie, installed into a temporary folder when Python cannot import
# them already (machines with no network). OUT_DIR (environment) keeps the JSON files (default: a
# temporary folder).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-}"
if [ -z "$bin" ]; then
  if [ -x "$here/../target/release/xlstm" ]; then bin="$here/../target/release/xlstm"; else bin="$(command -v xlstm || true)"; fi
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "side_by_side.sh: no xlstm binary: build it (cargo build --release -p xlstm-cli) or pass its path" >&2; exit 2; }
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"
if ! python3 -c "import xlstm, mlstm_kernels" 2>/dev/null; then
  wheels="${2:-}"
  [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "side_by_side.sh: python cannot import xlstm and mlstm_kernels: pass the folder of their wheels" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$out/site" "$wheels"/*.whl
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# cuBLAS and NVRTC where the CUDA toolkit puts them, unless the loader already finds them
if [ -d /usr/local/cuda/lib64 ] && [[ ":${LD_LIBRARY_PATH:-}:" != *":/usr/local/cuda/lib64:"* ]]; then
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader || true

ours() {  # name, then xlstm bench arguments
  local name=$1; shift
  "$bin" bench --config 7b --random-weights --device cuda --json "$@" > "$out/$name.json"
  echo "{\"ours\":\"$name\",\"result\":$(tail -1 "$out/$name.json")}"
}
for b in 1 16 64; do ours "decode_b$b" --batch "$b" --prompt-len 64 --gen-len 128; done
for rest in 0 1000; do
  ours "prefill_2048_rest$rest" --prompt-len 2048 --gen-len 8 --prefill-reps 5 --prefill-rest-ms "$rest"
  ours "prefill_8192_rest$rest" --prompt-len 8192 --gen-len 8 --prefill-reps 3 --prefill-rest-ms "$rest"
done
python3 "$here/peer.py" --runtime nxai --prompt-len 2048 8192 --batch 1 16 64 --prefill-rest-ms 0 1000 | tee "$out/peer.jsonl"

python3 - "$out" <<'EOF'
import json, sys, os
out = sys.argv[1]
ours = {f[:-5]: json.loads(open(os.path.join(out, f)).read().strip().splitlines()[-1]) for f in os.listdir(out) if f.endswith(".json")}
peer = [json.loads(l) for l in open(os.path.join(out, "peer.jsonl")) if l.startswith("{")]
rows = []
for b in (1, 16, 64):
    o = ours.get(f"decode_b{b}", {}).get("decode", {}).get("tok_s")
    p = next((r.get("tok_s") for r in peer if r["what"] == "decode" and r.get("batch") == b), None)
    rows.append((f"decode batch {b} (tok/s)", o, p))
for n in (2048, 8192):
    for rest in (0, 1000):
        o = ours.get(f"prefill_{n}_rest{rest}", {}).get("prefill", {}).get("tok_s")
        p = next((r.get("tok_s") for r in peer if r["what"] == "prefill" and r.get("tokens") == n and r.get("rest_ms") == rest), None)
        rows.append((f"prefill {n} tok/s ({'from idle' if rest else 'back to back'})", o, p))
print(f"{'':40} {'xlstm':>10} {'peer':>10} {'ratio':>7}")
for name, o, p in rows:
    f = lambda v: f"{v:10.1f}" if v else f"{'-':>10}"
    print(f"{name:40} {f(o)} {f(p)} {(o / p if o and p else float('nan')):7.2f}")
EOF
