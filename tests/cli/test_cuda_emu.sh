#!/usr/bin/env bash
# The CUDA backend end to end, its kernels run by the CPU emulator (tests/cuda_emu): training
# with system.backend = cuda on 1 and 2 ranks matches the CPU backend, a resumed CUDA run is
# bitwise the uninterrupted one, and eval and sample run on it. This exercises what the
# layer test cannot: the model and optimizer driving device memory, the host-staged expert
# exchange and gradient all-reduce (the emulator faults on any host access to device memory,
# as MPI without CUDA support would on a GPU), checkpoints written from device memory.
# Skipped (77) when the build has no emulator (MILLIPEDE_EMU unset).
if [ -z "${MILLIPEDE_EMU:-}" ]; then
    echo "SKIPPED: this build has no CUDA emulator (MILLIPEDE_CUDA_EMU=OFF or no C++ compiler)"
    exit 77
fi
. "$(dirname "$0")/ckpt_lib.sh"

# emu_train P RUN_DIR [args...]: ckpt_lib's train, with the emulated CUDA backend
emu_train() { MILLIPEDE=$MILLIPEDE_EMU train "$@" --set system.backend=cuda; }

train 1 "$tmp/cpu" || bad "CPU reference run: $(tail -3 "$tmp/cpu.out")"
for P in 1 2; do
    d="$tmp/cuda$P"
    if emu_train "$P" "$d"; then
        grep -q "backend cuda" "$d.out" && ok "P=$P: trained with backend cuda" ||
            bad "P=$P: the run does not say backend cuda"
        # Both sides are fp32 and differ in summation order only (~1e-7 per op), but a top-k
        # selection can flip on a near-tie and Adam amplifies gradients that are zero up to
        # rounding: the tolerances of another rank count or backend (ckpt_lib.sh, which also
        # shows what a wrong run does: a missing all-reduce is 1e-2 in the losses and O(1)
        # in the state, as is a stale device copy or a wrong staging of expert rows).
        check "P=$P: losses of steps 1-10 match the CPU backend ($XRUN_LOSS_TOL relative)" \
            compare_losses "$tmp/cpu" "$d" 1 10 $XRUN_LOSS_TOL
        check "P=$P: parameters and Adam state at step 10 match the CPU backend ($XRUN_STATE_TOL)" \
            compare_ckpt "$tmp/cpu/checkpoints/step_00000010" "$d/checkpoints/step_00000010" tol=$XRUN_STATE_TOL
    else
        bad "P=$P: backend cuda run failed: $(grep -m3 -E 'cuda-emu|error' "$d.out")"
    fi
done
# train.profile with the CUDA backend: the same run (the device is only synchronized and
# timed), and each step line carries the kernel timer's rows (backend.h kernel_times). They
# are consistent with the phase times: a phase's rows, each timed from the event before it
# on the device, fit in the phase, whose boundaries wait for the device; all rows together
# fit in the step; and on the emulator, whose "device" is the host, they account for most of
# a phase's time (the host's own work in a phase, the batch or the exchange plan, is small
# next to the emulated kernels). Mislabelled rows, a kernel counted twice or launches
# missed break one of these.
d="$tmp/cuda1prof"
if emu_train 1 "$d" --set train.profile=true; then
    check "P=1 profiled: bitwise the losses of the unprofiled run" compare_losses "$tmp/cuda1" "$d" 1 20
    python3 - "$d/metrics.jsonl" <<'PY' && ok "P=1 profiled: kernel rows in every step line, consistent with the phases" || bad "P=1 profiled: kernel rows"
import json, sys
L = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
assert len(L) == 20, len(L)
for d in L:
    k, p = d["kernel_ms"], d["phase_ms"]
    assert 0 < len(k) <= 64 and all(r["calls"] >= 1 and r["ms"] >= 0 for r in k), k
    assert [r["ms"] for r in k] == sorted((r["ms"] for r in k), reverse=True), k
    by_phase = {}
    for r in k:
        assert r["phase"] in p, r    # a phase name, or "other"
        by_phase[r["phase"]] = by_phase.get(r["phase"], 0.0) + r["ms"]
    # printed to 5e-4 ms each; event and host clocks: 0.05 ms of slack per phase
    for ph, ms in by_phase.items():
        assert ms <= p[ph] + 0.05, (ph, ms, p[ph])
    assert d["kernel_total_ms"] <= d["ms"] + 0.05, (d["kernel_total_ms"], d["ms"])
    for ph in ("fwd.peer", "bwd.peer", "fwd.attention", "optimizer"):
        assert by_phase.get(ph, 0.0) >= 0.5 * p[ph], (ph, by_phase.get(ph), p[ph])
PY
    grep -q "kernels (ms, rank 0): " "$d.out" && ok "P=1 profiled: the log names the longest kernels" ||
        bad "P=1 profiled: the log names the longest kernels"
else
    bad "P=1 profiled run failed: $(grep -m3 -E 'cuda-emu|error' "$d.out")"
fi
# the emulator has one GPU unless MP_EMU_DEVICES says otherwise, as the real GPU machine:
# two ranks share it, so auto takes the host-staged transport and says why
grep -q "transport: mpi_staged (auto: ranks 0 and 1 share GPU 0" "$tmp/cuda2.out" &&
    ok "P=2 on one GPU: auto chose mpi_staged and said why" ||
    bad "P=2 on one GPU: auto chose mpi_staged and said why ($(grep -m1 transport: "$tmp/cuda2.out"))"

# NCCL on the emulator's stand-in (tests/cuda_emu/emu_nccl.cpp: the same calls and group
# semantics over MPI, refusing host pointers and unmatched sends), one GPU per rank. No
# activation may cross the host here: the emulator faults on host access to device memory,
# and the stand-in refuses host buffers. The same tolerances as above against the CPU.
# tools/gpu_check.sh runs this file on a real one-GPU machine with MP_TEST_NCCL_RANKS=1:
# there NCCL refuses two ranks on the one GPU.
for P in ${MP_TEST_NCCL_RANKS:-1 2 3}; do
    d="$tmp/nccl$P"
    if MP_EMU_DEVICES=4 emu_train "$P" "$d" --set system.transport=nccl; then
        grep -q "transport: nccl" "$d.out" && ok "P=$P nccl: the run says transport nccl" ||
            bad "P=$P nccl: the run says transport nccl"
        check "P=$P nccl: losses of steps 1-10 match the CPU backend ($XRUN_LOSS_TOL relative)" \
            compare_losses "$tmp/cpu" "$d" 1 10 $XRUN_LOSS_TOL
        check "P=$P nccl: parameters and Adam state at step 10 match the CPU backend ($XRUN_STATE_TOL)" \
            compare_ckpt "$tmp/cpu/checkpoints/step_00000010" "$d/checkpoints/step_00000010" tol=$XRUN_STATE_TOL
    else
        bad "P=$P nccl: run failed: $(grep -m3 -E 'cuda-emu|error|nccl' "$d.out")"
    fi
done
# A rank whose NCCL call never finishes (the stand-in's MP_EMU_NCCL_FAULT: rank 1's 5th
# call's GPU work never completes, and NCCL reports no error, as when a peer stops) ends the
# run with one line once system.nccl_timeout has passed, not a hang; the other rank, blocked
# in the next exchange, goes down with it (MPI_Abort). Only the stand-in injects faults: not
# on a real GPU (MP_TEST_NCCL_RANKS set by tools/gpu_check.sh).
if [ -z "${MP_TEST_NCCL_RANKS:-}" ]; then
    d="$tmp/nccl_stall"
    # 10 s: ranks reach a call seconds apart on a busy machine, and that counts
    MP_EMU_DEVICES=4 MP_EMU_NCCL_FAULT=stall:1:5 emu_train 2 "$d" --set system.transport=nccl \
        --set system.nccl_timeout=10; rc=$?
    [ "$rc" != 0 ] &&
        grep -qE "^millipede: rank 1: the (all-to-all|all-reduce) \(nccl[A-Za-z/]+\) did not finish within system.nccl_timeout = 10 s" "$d.out" &&
        ok "P=2 nccl, rank 1 stalled: the run ends with its one line after system.nccl_timeout" ||
        bad "P=2 nccl, rank 1 stalled: exit $rc, $(grep -m2 -E 'millipede: rank|cuda-emu' "$d.out")"
fi
# The exchange's sums have a fixed order whatever moves the bytes (src/model/exchange.c), and
# both transports sum the gradients with MPI's all-reduce here (the stand-in's is MPI's):
# nccl and mpi_staged on 2 ranks are the same run, bit for bit. A transport that delivered
# a segment to the wrong place or out of order would differ by O(1) somewhere.
if [ -d "$tmp/nccl2/checkpoints/step_00000020" ]; then
    check "P=2: nccl and mpi_staged give bitwise the same run" \
        compare_ckpt "$tmp/cuda2/checkpoints/step_00000020" "$tmp/nccl2/checkpoints/step_00000020" exact
fi
# transport = nccl where ranks share a GPU: refused on every rank with one line
d="$tmp/nccl_shared"
if emu_train 2 "$d" --set system.transport=nccl; then
    bad "P=2 on one GPU: transport = nccl was accepted"
else
    grep -q "system.transport = nccl: ranks 0 and 1 share GPU 0" "$d.out" &&
        ok "P=2 on one GPU: transport = nccl refused, naming the shared GPU" ||
        bad "P=2 on one GPU: transport = nccl refused, naming the shared GPU ($(grep -m1 error "$d.out"))"
fi
# a head size above the CUDA attention kernels' 128 (258 / 2 = 129): refused when the model
# is built, with one line and exit status 2, not mid-step
d="$tmp/bighead"
emu_train 1 "$d" --set model.d_model=258 --set model.n_heads=2; rc=$?
[ "$rc" = 2 ] && grep -q "error: system.backend = cuda: attention head size 129" "$d.out" &&
    ok "head size 129: refused at model build (exit 2, one line)" ||
    bad "head size 129: refused at model build (exit $rc: $(grep -m1 -E 'error|cuda-emu' "$d.out"))"

# system.precision = bf16 on 2 ranks: the fp32 masters train and are what the checkpoint
# holds; the losses follow the fp32 run to the bf16 rounding. Rounding to 8 significant bits
# moves a value by <= 2^-8 ~ 4e-3 relative: the expert tables U and V, so the PEER output by
# <= 2 * 2^-8 (first order, every error of one sign), and both operands of every dense GEMM
# (the attention and MLP projections, the LM head, the query projection's backward), so each
# GEMM output by <= 2 * 2^-8 of the sum of its |terms| (typically ~2^-8 of its norm: random
# signs). The route (query projection, sub-key scores) stays fp32, so selections change only
# where these errors upstream cross a near-tie (XRUN_LOSS_TOL's flips). The loss moves by
# <= 2 max |d logit| per token (cross-entropy's gradient has L1 norm <= 2) and its average
# over 192 tokens by far less; the masters keep the updates in fp32, so one step's rounding
# does not pile up over 10 steps. Measured on the emulator: 5.0e-4 (3.5e-4 with the tables
# alone bf16). 1e-2 is 20x that; wrong or stale rows, a GEMM on wrong operands are the errors
# of the fp32 runs above, caught there (and by test_cuda_backend's bf16 checks, which bound
# each GEMM elementwise); a stale bf16 twin of an operand (backend.h), which moves the losses
# by far less than 1e-2, is caught by test_cuda_backend's test_bf16_twins_model, bit for bit.
b="$tmp/cuda2bf16"
if emu_train 2 "$b" --set system.precision=bf16; then
    check "P=2 bf16: losses of steps 1-10 follow the CPU's fp32 (1e-2 relative)" \
        compare_losses "$tmp/cpu" "$b" 1 10 1e-2
    python3 - "$tmp/cpu" "$b" <<'PY'
import json, sys
def losses(d):
    return {x["step"]: x["loss"] for x in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in x}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print("   bf16 vs fp32: largest relative loss difference over steps 1-10: %.2g" %
      max(abs(a[s] - b[s]) / abs(a[s]) for s in range(1, 11)))
PY
    # the masters keep fp32 precision: the optimizer's small steps are not rounded away
    python3 - "$b/checkpoints/step_00000020" <<'PY' && ok "P=2 bf16: the checkpoint holds fp32 master tables" || bad "P=2 bf16: the checkpoint holds fp32 master tables"
import sys, h5py, numpy as np
with h5py.File(sys.argv[1] + "/index.h5", "r") as f:
    for name in ("h1.peer.u", "h1.peer.v"):
        x = f["params"][name][()]
        low = (x.view(np.uint32) & 0xFFFF) != 0
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), name
        # an fp32 value has 16 zero low bits with probability 2^-16, a bf16 one always:
        # ~1.0 for fp32 masters, 0 for tables kept in bf16
        assert low.mean() > 0.9, f"{name}: only {low.mean():.2f} of the values use fp32 bits"
PY
else
    bad "P=2 bf16 run failed: $(grep -m3 -E 'cuda-emu|error' "$b.out")"
fi

# determinism through a checkpoint: resume the 2-rank CUDA run at step 10 (bitwise: the same
# binary and rank count run the same kernels in the same order from the same bits)
r="$tmp/cuda2r"
if emu_train 2 "$r" --resume "$tmp/cuda2/checkpoints/step_00000010"; then
    check "P=2: resumed CUDA run is bitwise the uninterrupted one" \
        compare_ckpt "$tmp/cuda2/checkpoints/step_00000020" "$r/checkpoints/step_00000020" exact
else
    bad "P=2: resumed CUDA run failed: $(grep -m3 -E 'cuda-emu|error' "$r.out")"
fi

# another rank count: the 2-rank CUDA checkpoint of step 10 resumed on 3 ranks (the loader
# writes each rank's new shard of rows into device memory)
r3="$tmp/cuda3r"
if emu_train 3 "$r3" --resume "$tmp/cuda2/checkpoints/step_00000010"; then
    # 3 ranks sum in another order (and give OpenBLAS other shapes): rounding and top-k flips,
    # ckpt_lib.sh's tolerances. Seen with the Haswell kernels (an AVX2 machine) and
    # model.init_std = 0.02: steps 11-20 flip ~5 times, losses differ by up to 2e-5; a wrong
    # row loaded into device memory is O(1) in the state (ckpt_lib.sh's table).
    check "P=2 -> 3: resumed CUDA run follows the uninterrupted one (losses $XRUN_LOSS_TOL)" \
        compare_losses "$tmp/cuda2" "$r3" 11 20 $XRUN_LOSS_TOL
    check "P=2 -> 3: final parameters and Adam state follow the uninterrupted run ($XRUN_STATE_TOL)" \
        compare_ckpt "$tmp/cuda2/checkpoints/step_00000020" "$r3/checkpoints/step_00000020" tol=$XRUN_STATE_TOL
else
    bad "P=2 -> 3: resumed CUDA run failed: $(grep -m3 -E 'cuda-emu|error' "$r3.out")"
fi

# eval of the CPU-trained model on the CUDA backend gives the CPU's number
ck="$tmp/cpu/checkpoints/step_00000020"
"$MILLIPEDE" eval "$cfg" "${small[@]}" --model "$ck" > "$tmp/eval_cpu.out" 2>&1
"$MILLIPEDE_EMU" eval "$cfg" "${small[@]}" --set system.backend=cuda --model "$ck" \
    > "$tmp/eval_cuda.out" 2>&1
python3 - "$tmp/eval_cpu.out" "$tmp/eval_cuda.out" $XRUN_LOSS_TOL <<'PY' && ok "eval on cuda matches the CPU" || bad "eval on cuda matches the CPU"
import json, sys
def loss(p):
    return json.loads(open(p).read().strip().splitlines()[-1])["val_loss"]
a, b = loss(sys.argv[1]), loss(sys.argv[2])
print(f"   eval loss: cpu {a}, cuda {b}")
# one forward of 384 tokens on each backend: summation order (~1e-7) and possible top-k
# flips (<= ~4e-5 each at 384 tokens): XRUN_LOSS_TOL; wrong weights are O(1e-3..1)
assert abs(a - b) <= float(sys.argv[3]) * abs(a), (a, b)
PY
# sampling: the same seed draws the same text on both backends (same logits to ~1e-7, so
# a draw would have to land within that of a boundary to differ; deterministic inputs. A
# top-k flip in one of the 40 forwards moves that token's logits by ~1e-2, and changes the
# draw only if it lands within that of a boundary: a small chance, not zero)
for b in cpu cuda; do
    bin=$MILLIPEDE; [ "$b" = cuda ] && bin=$MILLIPEDE_EMU
    "$bin" sample "$cfg" "${small[@]}" --set "system.backend=$b" --model "$ck" \
        --prompt "Line 3 of" --tokens 40 > "$tmp/sample_$b.out" 2>&1
done
[ -s "$tmp/sample_cuda.out" ] && cmp -s "$tmp/sample_cpu.out" "$tmp/sample_cuda.out" &&
    ok "sample on cuda draws the CPU's text" ||
    { bad "sample on cuda draws the CPU's text"; tail -3 "$tmp/sample_cpu.out" "$tmp/sample_cuda.out"; }
finish
