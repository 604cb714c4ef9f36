"""The ``unimm`` command."""

from __future__ import annotations

import argparse
import platform
import sys


def info_lines() -> list[str]:
    """What ``unimm info`` prints: versions, GPU, the compiled extension, live backends."""
    import torch

    import unimm
    from unimm import _ext
    from unimm.kernels import dispatch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    lines = [
        f"unimm    {unimm.__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {triton_version}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"GPU {index}    {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("GPU      none")

    build = _ext.build_info()
    if build is None:
        lines.append(f"_C       not built ({_ext.load_error})")
    else:
        runtime = build["cudart_version"]
        driver = _ext.lib().driver_version()
        lines.append(f"_C       built with nvcc {build['nvcc_version']} for {', '.join(_ext.compiled_archs())}; "
                     f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10} (static), "
                     f"driver {'none' if not driver else f'{driver // 1000}.{driver % 1000 // 10}'}")

    forced = dispatch.forced_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lines.append(f"backends for {device} tensors (UNIMM_BACKEND={forced or 'unset'}, "
                 f"TRITON_INTERPRET={int(dispatch.TRITON_INTERPRET)}):")
    for backend, reason in dispatch.live_backends(device).items():
        lines.append(f"  {backend:<9} {'live' if reason is None else 'not live: ' + reason}")
    from unimm.kernels import _attention_vendor

    lines.append("attention on CUDA, fp16 / bf16 (automatic dispatch), by mask layout:")
    lines += [f"  {layout:<58} {served}" for layout, served in _attention_vendor.served_layouts().items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unimm", description="unimm: kernels for unified multimodal models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU, compiled extension and live backends")
    demo = commands.add_parser("demo", help="train a small unified model on procedural shapes and evaluate it",
                               description="Trains a small unified model from scratch (captioning, text-to-image "
                                           "over VQ codes and over continuous tokens) and writes samples.png, "
                                           "loss.png and metrics.json.")
    demo.add_argument("--config", choices=("default", "gpu", "smoke"), default="default",
                      help="preset: default (2 CPU cores, <= 10 minutes), gpu (larger model, longer run), "
                           "smoke (seconds; checks the pipeline)")
    demo.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    demo.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    demo.add_argument("--out", default="unimm-demo", help="output directory (default ./unimm-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and sampling (default 0)")
    bench = commands.add_parser("bench", help="time unimm against the anchors, family by family; one summary table",
                                description="Runs the benchmark families (unimm.bench.<family>), each in its own "
                                            "process, against the strongest installed anchors; writes each family's "
                                            "JSON, a summary JSON and the performance page, then prints one summary "
                                            "table. A family's own options: python -m unimm.bench.<family> --help.")
    from unimm.bench import suite

    suite.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return suite.main(args, bench)
    if args.command == "info":
        print("\n".join(info_lines()))
    elif args.command == "demo":
        from unimm.demo.train import MAX_SEED, PRESETS, output_dir, resolve_device, run

        # every argument is checked before any work: one "unimm demo: error: ..." line, exit code 2
        config = PRESETS[args.config]
        if args.steps is not None:
            if args.steps < 1:
                demo.error(f"--steps must be >= 1, got {args.steps}")
            config = config.replace(steps=args.steps)
        if not 0 <= args.seed <= MAX_SEED:
            demo.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
        try:
            device = resolve_device(args.device)
        except ValueError as err:
            demo.error(f"--device: {err}")
        try:
            out = output_dir(args.out)
        except ValueError as err:
            demo.error(f"--out: {err}")
        run(config, out, device=device, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
