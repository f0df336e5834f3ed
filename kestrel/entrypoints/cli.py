"""Command line: `kestrel generate ...` (also `python -m kestrel`).

Owns argument parsing. Engine and sampling flags are derived from the config and
SamplingParams dataclass fields, so a new option appears here without edits.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from kestrel.config import flat_fields
from kestrel.sampling_params import SamplingParams

_SKIP_SAMPLING = {"extra", "logit_bias"}


def _flag_kwargs(field: dataclasses.Field) -> dict[str, Any] | None:
    """argparse kwargs for a dataclass field, from its (string) annotation."""
    ann = str(field.type)
    default = field.default if field.default is not dataclasses.MISSING else None
    if "dict" in ann or "Any" in ann:
        return None
    if ann.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction, "default": default}
    if "list[str]" in ann:
        return {"nargs": "+", "type": str, "default": None}
    if "list[int]" in ann:
        return {"nargs": "+", "type": int, "default": None}
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if ann.startswith(name) or f"| {name}" in ann:
            return {"type": typ, "default": default}
    return None


def _field_comments(*classes: type) -> dict[str, str]:
    """The trailing `# comment` of each dataclass field: the fields' one documentation."""
    found: dict[str, str] = {}
    for cls in classes:
        for match in re.finditer(r"^\s+(\w+): [^#\n]*# (.+)$", inspect.getsource(cls), re.M):
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def _add_fields(group: argparse._ArgumentGroup, fields: Sequence[dataclasses.Field],
                skip: set[str], *doc_classes: type) -> list[str]:
    from kestrel import config

    docs = _field_comments(config.ModelConfig, config.CacheConfig, config.SchedulerConfig,
                           SamplingParams, *doc_classes)
    names = []
    for f in fields:
        if f.name in skip:
            continue
        kwargs = _flag_kwargs(f)
        if kwargs is None:
            continue
        default = kwargs.get("default")
        shown = "" if default in (None, "") else f" (default: {default})"
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                           help=docs.get(f.name, f.name.replace("_", " ")) + shown, **kwargs)
        names.append(f.name)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, list[str]]]:
    parser = argparse.ArgumentParser(prog="kestrel", description="kestrel LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts offline and print the results")
    gen.add_argument("prompts", nargs="+", help="prompt text (one or more)")
    gen.add_argument("--chat", action="store_true",
                     help="treat each prompt as one user message and apply the chat template")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.add_argument("--verbose", action="store_true", help="log engine start-up details")
    eng = gen.add_argument_group("engine options")
    eng_names = _add_fields(eng, list(flat_fields().values()), set())
    smp = gen.add_argument_group("sampling options")
    smp_names = _add_fields(smp, dataclasses.fields(SamplingParams), _SKIP_SAMPLING)
    server_names = _add_serve(sub)
    return parser, {"engine": eng_names, "sampling": smp_names, "server": server_names}


def _add_serve(sub: Any) -> list[str]:
    """`kestrel serve` and `kestrel bench serve`; returns the server option names."""
    from kestrel.bench import serving
    from kestrel.entrypoints.openai.server_config import ServerConfig

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    srv.add_argument("model_path", nargs="?",
                     help="HF model folder (default: --model, else the shipped default model)")
    srv.set_defaults(verbose=True)
    _add_fields(srv.add_argument_group("engine options"), list(flat_fields().values()), set())
    names = _add_fields(srv.add_argument_group("server options"),
                        dataclasses.fields(ServerConfig), set(), ServerConfig)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serving.add_arguments(bench_sub.add_parser(
        "serve", help="drive a running OpenAI-compatible server and measure latency"))
    from kestrel.bench import throughput

    tput = bench_sub.add_parser(
        "throughput", help="offline generation throughput next to its roofline and HF")
    throughput.add_arguments(tput)
    _add_fields(tput.add_argument_group("engine options"),
                [f for f in flat_fields().values() if f.name != "model"], set())
    return names


def run_serve(args: argparse.Namespace, groups: dict[str, list[str]]) -> int:
    try:
        from kestrel.entrypoints.openai.api_server import run_server
    except ImportError as exc:
        print(f"error: {exc.name} is missing; install the server extra: "
              "pip install 'kestrel[server]'", file=sys.stderr)
        return 2
    from kestrel.config import EngineConfig
    from kestrel.entrypoints.openai.server_config import ServerConfig

    engine_opts = _collect(args, groups["engine"])
    model = args.model_path or engine_opts.pop("model", None)
    engine_opts.pop("model", None)
    if not model:
        from kestrel.assets import default_model_path

        model = default_model_path()
    server = ServerConfig(**_collect(args, groups["server"]))
    run_server(EngineConfig.from_kwargs(model, **engine_opts), server)
    return 0


def _collect(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def run_generate(args: argparse.Namespace, groups: dict[str, list[str]]) -> int:
    from kestrel.engine.llm import LLM

    engine_opts = _collect(args, groups["engine"])
    model = engine_opts.pop("model", None) or None  # None: the shipped default model
    params = SamplingParams(**_collect(args, groups["sampling"]))
    llm = LLM(model, **engine_opts)
    if args.chat:
        convs = [[{"role": "user", "content": p}] for p in args.prompts]
        outputs = llm.chat(convs, params, use_tqdm=not args.no_progress)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=not args.no_progress)
    for prompt, out in zip(args.prompts, outputs):
        for comp in out.outputs:
            tag = f" [sample {comp.index}]" if len(out.outputs) > 1 else ""
            print(f"----- prompt{tag} (finish: {comp.finish_reason})")
            print(prompt + comp.text if not args.chat else comp.text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, groups = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "generate":
            return run_generate(args, groups)
        if args.command == "serve":
            return run_serve(args, groups)
        if args.command == "bench" and args.bench_command == "throughput":
            from kestrel.bench import throughput

            opts = _collect(args, [n for n in groups["engine"] if n != "model"])
            return throughput.run(args, opts)
        if args.command == "bench" and args.bench_command == "serve":
            from kestrel.bench import serving

            return serving.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
