"""Packed rows: SDPA with the dense block-causal mask vs FlexAttention with the same rule as a block mask.

A packed row holds several conversations; the dense `[B, 1, T, T]` mask keeps SDPA off its flash kernel
(it takes the masked efficient or math kernel, computing every tile), while the FlexAttention block mask
keeps a fused kernel that skips the tiles between conversations and above the diagonal. Both run the
same backbone weights on the same packed batch, in turns; each step builds its mask, as training does.
A last row runs plain causal attention over the whole row (`is_causal`, flash on CUDA): wrong for packed
rows (it attends across conversations), but what the unmasked fused kernel costs. Prints milliseconds per
step, the ratio to the dense mask, the attention kernel each path gets on CUDA, and how far the two
masked paths differ.

    python bench/bench_attention.py --device cuda --preset 100m --seq-len 2048 --dtype bf16
    python bench/bench_attention.py --device cpu --preset tiny --seq-len 2048

On CUDA a step is forward + backward of the backbone, FlexAttention compiled (the first steps compile it).
On CPU FlexAttention has no backward, so a step is the forward only; the model runs it eager there (its
reference implementation, which materialises the scores), and an extra row times the compiled CPU kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
import warnings
from unittest import mock

import torch
from torch.nn.attention.flex_attention import flex_attention

import csm_train.model as model_module
from csm_train import CSM, CSMConfig
from csm_train.data import attention_mask

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def packed_doc_ids(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`doc_ids, input_pos [B, T]` of rows packed like the trainer's: conversations of T/8..T/2 frames
    (~15 s to a minute at T=2048), the last one sized to leave 0..3 % of the row as padding (doc -1)."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.full((batch, seq_len), -1, dtype=torch.long)
    input_pos = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        start, doc, full = 0, 0, False
        while not full:
            n = int(torch.randint(seq_len // 8, seq_len // 2 + 1, (), generator=g))
            full = start + n >= seq_len
            if full:  # the look-ahead buffer's best fit tops the row up
                n = max(0, seq_len - start - int(torch.randint(0, seq_len // 32 + 1, (), generator=g)))
            doc_ids[row, start : start + n], input_pos[row, start : start + n] = doc, torch.arange(n)
            start, doc = start + n, doc + 1
    return doc_ids, input_pos


def attention_kernels(fn, device) -> list[str]:
    """Names of the attention kernels a CUDA step launches (SDPA's flash / efficient / cuDNN, or Triton's
    flex kernel); none of these means the math path (matmuls and a softmax)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    pattern = re.compile(r"flash|fmha|efficient|cudnn|attention|flex|triton_tem", re.I)
    return sorted({e.key for e in prof.key_averages() if pattern.search(e.key)})


def backend_of(kernels: list[str]) -> str:
    names = " ".join(kernels).lower()
    for backend, marks in [  # cuDNN first: its kernels' names say "flash" too
        ("cudnn", ("cudnn",)),
        ("flash", ("flash",)),
        ("efficient", ("fmha", "efficient", "mem_eff")),
        ("flex (triton)", ("flex", "triton_tem")),
    ]:
        if any(m in names for m in marks):
            return backend
    return "math"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16: autocast, fp32 weights")
    parser.add_argument("--steps", type=int, default=None, help="timed steps each (default: 10 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps each (compiles FlexAttention)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # CPU: said above
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    batch = args.batch or (4 if cuda else 1)
    steps = args.steps or (10 if cuda else 3)
    train = cuda  # FlexAttention has no CPU backward
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    config = CSMConfig.preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):  # CSM's init, on the device (quick); the backbone is all this measures
        backbone = CSM(config).backbone.train()
    backbone.activation_checkpointing = args.checkpointing
    doc_ids, input_pos = (t.to(device) for t in packed_doc_ids(batch, args.seq_len))
    x = torch.randn(batch, args.seq_len, config.backbone.dim, generator=torch.Generator().manual_seed(1)).to(device)
    docs_per_row = [int(r.max()) + 1 for r in doc_ids]
    padding = float((doc_ids < 0).float().mean())

    DENSE, FLEX, COMPILED, CAUSAL = (
        "dense mask, SDPA",
        "block mask, FlexAttention",
        "block mask, flex compiled",
        "causal only (wrong for packing)",
    )
    masks = {DENSE: lambda: attention_mask(doc_ids), FLEX: lambda: attention_mask(doc_ids, flex=True)}
    if not cuda:  # the model runs flex eager on CPU; its compiled CPU kernel (forward only) is the fused figure
        masks[COMPILED] = masks[FLEX]
    masks[CAUSAL] = lambda: None
    compiled_flex = torch.compile(flex_attention)

    def step(name):
        def run():
            backbone.zero_grad(set_to_none=True)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))
                stack.enter_context(torch.set_grad_enabled(train))
                if name == COMPILED:
                    stack.enter_context(
                        mock.patch.object(
                            model_module,
                            "document_attention",
                            lambda q, k, v, mask: compiled_flex(q, k, v, block_mask=mask, enable_gqa=True),
                        )
                    )
                out = backbone(x, input_pos=input_pos, mask=masks[name]())
                if train:
                    out.float().square().mean().backward()
            return out

        return run

    runs = {name: step(name) for name in masks}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    sync()

    # The two masked paths must agree (the CPU tests check fp32 exactly; this is the GPU kernel's check).
    dense_out, dense_grad = runs[DENSE]().float(), backbone.layers[0].attn.q_proj.weight.grad
    flex_out, flex_grad = runs[FLEX]().float(), backbone.layers[0].attn.q_proj.weight.grad
    out_err = float((flex_out - dense_out).abs().max() / dense_out.abs().max())
    grad_err = f"{float((flex_grad - dense_grad).abs().max() / dense_grad.abs().max()):.1e}" if train else "n/a"

    samples = {name: [] for name in runs}
    peaks = {}
    for _ in range(steps):
        for name, run in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            run()
            sync()
            samples[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
    ms = {name: 1000 * statistics.median(s) for name, s in samples.items()}

    build_ms = {}
    for name in (DENSE, FLEX):
        sync()
        start = time.perf_counter()
        for _ in range(3):
            masks[name]()
        sync()
        build_ms[name] = 1000 * (time.perf_counter() - start) / 3

    backends = {}
    if cuda:
        for name, run in runs.items():
            try:
                kernels = attention_kernels(run, device)
                backends[name] = f"{backend_of(kernels)} [{', '.join(k[:60] for k in kernels[:3])}]"
            except Exception as error:  # the profiler is a report, never a reason to lose the figures
                backends[name] = f"unknown (profiler: {error})"

    what = "forward + backward" if train else "forward only (no FlexAttention backward on CPU; eager flex)"
    print(
        f"backbone of {args.preset} ({config.backbone.num_layers} layers, dim {config.backbone.dim}), {batch} × "
        f"{args.seq_len} frames, {args.dtype}, {device.type}{', checkpointing' if args.checkpointing else ''}; "
        f"{what}; conversations per row {docs_per_row}, padding {padding:.1%}; medians of {steps} steps"
    )
    for name in runs:
        line = f"  {name:32s} {ms[name]:9.1f} ms/step  {ms[DENSE] / ms[name]:5.2f}× dense"
        if name in build_ms:
            line += f"  (mask build {build_ms[name]:.2f} ms)"
        if name in peaks:
            line += f"  peak {peaks[name]:.2f} GiB"
        if name in backends:
            line += f"  kernel: {backends[name]}"
        print(line)
    print(f"  flex vs dense: max |Δ output| {out_err:.1e}, max |Δ grad q_proj[0]| {grad_err} (relative to max)")
    dense_backend = backends.get(DENSE, "n/a on cpu").split(" [")[0]
    cpu_compiled = f"; compiled flex {ms[COMPILED]:.1f} ms = {ms[DENSE] / ms[COMPILED]:.2f}x" if not cuda else ""
    print(
        f"attention: {args.preset} {batch}x{args.seq_len} {args.dtype} {device.type}: dense-mask SDPA "
        f"({dense_backend}) {ms[DENSE]:.1f} ms, FlexAttention block mask {ms[FLEX]:.1f} ms = "
        f"{ms[DENSE] / ms[FLEX]:.2f}x{cpu_compiled}; causal-only {ms[CAUSAL]:.1f} ms; "
        f"{'fwd+bwd' if train else 'fwd only'}; rel err out {out_err:.1e} grad {grad_err}"
    )


if __name__ == "__main__":
    main()
