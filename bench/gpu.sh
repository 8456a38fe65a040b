#!/usr/bin/env bash
# The three benchmark scenarios (peers, scale, precision) in one go, sized for one CUDA GPU:
# under 10 minutes on a current data-centre GPU. With --cpu the same scripts run on the CPU.
#
#   bash bench/gpu.sh                          # CUDA, ViT-B-16, sizes for a GPU
#   bash bench/gpu.sh --cpu --quick            # CPU, each script's --quick mode (the smoke test)
#   bash bench/gpu.sh --out DIR                # JSON results folder (default: bench/results)
#   bash bench/gpu.sh --redis-url redis://h:6379/0   # Redis for the scale scenario
#
# The scale scenario uses Redis when one answers at --redis-url (default redis://127.0.0.1:6379/0)
# and says so when it runs on the directory store alone.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
quick=0
out=bench/results
redis_url=redis://127.0.0.1:6379/0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) device=cpu ;;
        --quick) quick=1 ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        --redis-url) redis_url="${2:?--redis-url needs a URL}"; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument '$1' (use --cpu, --quick, --out DIR, --redis-url URL)" >&2; exit 2 ;;
    esac
    shift
done

py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if [ "$device" = cuda ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: torch sees no CUDA GPU here: run 'bash bench/gpu.sh --cpu' instead" >&2
    exit 2
fi

redis=(--redis-url "$redis_url")
if ! "$py" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()' "$redis_url" 2>/dev/null; then
    echo "bench/gpu.sh: no Redis answers at $redis_url: the scale scenario runs on the directory store only"
    redis=(--no-redis)
fi

common=(--device "$device" --out "$out")
if [ "$quick" = 1 ]; then
    peers=(--quick) scale=(--quick) precision=(--quick)
elif [ "$device" = cuda ]; then
    # A ViT-B-16 forward takes milliseconds here: many more batches than on a CPU; all 100
    # full models fit in 40 GiB; reloads (330 MB host -> device each) bound the peers' time.
    peers=(--batches 60,30 --repeats 3 --memory-cap-gib 40)
    scale=()
    precision=(--batches 1,64 --repeats 20)  # speed only unless given uda-train workdirs
else
    peers=() scale=() precision=()
fi

echo "== peers ($device) =="
"$py" -m bench.peers "${common[@]}" "${peers[@]}"
echo "== scale ($device) =="
"$py" -m bench.scale "${common[@]}" "${redis[@]}" "${scale[@]}"
echo "== precision ($device) =="
"$py" -m bench.precision "${common[@]}" "${precision[@]}"
