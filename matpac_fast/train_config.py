"""Training configuration: small dataclasses, recipe presets, and a command line built from them.

Model architecture lives in `matpac_fast.config.ModelConfig` (presets `matpac`, `matpac_plusplus`, `m2d`, `tiny`);
this file owns what the trainer needs: optimisation, schedules, data, hardware, checkpoint cadence. A recipe is a
named set of defaults (`paper` reproduces METHOD.md §5); every field can be overridden on the command line, and
model fields with `--model KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matpac_fast.cli_args import path_arg


@dataclass
class OptimConfig:
    lr: float = 3e-4  # absolute (not scaled by batch), as the authors
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05  # on all parameters, as the authors
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-6
    clip_grad: float = 3.0  # 0 disables
    grad_accum: int = 1


@dataclass
class ScheduleConfig:
    epochs: float = 300.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps (schedules still span `epochs`)
    tau_t_warmup_epochs: float = 10.0  # end-points: model fields tau_t_start / tau_t_end
    # EMA end-points are model fields (ema_start, ema_end, head_ema_start, head_ema_end: --model KEY=VALUE)
    ema_reference_batch: int = 2048  # decays are given for this global batch; rho -> rho**(batch/ref). 0: as given
    # MATPAC++'s temperature 0.1 * 0.99997**step is the authors' curve over their 294,816 updates: a run of N steps
    # follows it at step * ref / N, so that the soft-to-hard switch (78 % of their run) keeps its place whatever the
    # batch, data and epochs (METHOD.md §5: step-count schedules scale). 0: raw optimizer steps.
    mcl_reference_steps: int = 294816


@dataclass
class DataConfig:
    shards: str = ""  # directory, brace pattern, URL list, or "synthetic:N" (N random clips, no I/O)
    batch_size: int = 256  # per device
    workers: int = 8
    epoch_mode: str = "exact"  # exact | resampled
    on_error: str = "warn"  # warn | raise (corrupt shards)
    data_timeout: float = 600.0  # seconds for one batch from the workers before the run stops (0: no limit)


@dataclass
class RunConfig:
    out: str = "runs/matpac"
    preset: str = "matpac"  # model preset
    frontend: str = "matpac"
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 | no
    compile: str = "off"  # off | block | step
    compile_mode: str = "default"  # torch.compile mode, one of COMPILE_MODES (see `compile_kwargs`)
    kernels: bool = False
    log_every: int = 50
    ckpt_every: int = 2000  # optimizer steps; 0: only at the end / on signal
    keep_last: int = 3
    resume: str = ""  # "" | auto | path to a checkpoint directory
    max_nonfinite: int = 20  # consecutive non-finite steps before aborting
    cpu: bool = False
    deterministic: bool = False
    progress: bool = True
    peak_tflops: float = 0.0  # for MFU; 0: look the device up in a table


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of ModelConfig fields
    # torch.compile's Inductor options (torch._inductor.config names), added to --compile-mode's: `compile_kwargs`
    inductor: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(
            run=RunConfig(**d.get("run", {})),
            data=DataConfig(**d.get("data", {})),
            optim=OptimConfig(**d.get("optim", {})),
            schedule=ScheduleConfig(**d.get("schedule", {})),
            model=dict(d.get("model", {})),
            inductor=dict(d.get("inductor", {})),
        )


# Recipes: named defaults. `paper` = METHOD.md §5 (8 GPUs x 256). `tiny` = the CPU demo.
RECIPES: dict[str, dict] = {
    "paper": {},
    "tiny": {
        "run": {"preset": "tiny", "precision": "no", "log_every": 10, "ckpt_every": 0, "cpu": True},
        "data": {"batch_size": 32, "workers": 1},
        "optim": {"lr": 1e-3, "warmup_epochs": 1.0},
        "schedule": {"epochs": 10.0, "tau_t_warmup_epochs": 2.0, "ema_reference_batch": 0},
        # A few hundred steps instead of 300k: the teacher must move within them.
        "model": {"ema_start": 0.99, "ema_end": 0.999, "head_ema_start": 0.99, "head_ema_end": 1.0},
    },
}

# torch.compile's own modes plus "gemm-autotune" (ours): see `compile_kwargs`.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "gemm-autotune")
# "gemm-autotune": CUDA graphs, as reduce-overhead, plus Inductor's GEMM autotuning: Triton GEMM templates compete
# with cuBLAS for each matrix product, and a template that wins can take the element-wise work after it (bias, the
# exact GELU, casts) into its epilogue, the ~30 % of a step that is not GEMMs (benchmarks/RESULTS.md). Without
# max-autotune's coordinate-descent tuning of every other kernel, meant to compile faster: max-autotune-no-cudagraphs
# did not finish compiling within 3 minutes on an H200 (which of its parts took the time was not measured). It did
# not help enough: gemm-autotune had not finished either after 4 minutes on an H200 (13 forward GEMMs tuned, 8-25 s
# each; benchmarks/results/autotune_nvidia_h200_5702997.txt).
GEMM_AUTOTUNE_OPTIONS = {"max_autotune_gemm": True, "coordinate_descent_tuning": False, "triton.cudagraphs": True}


def compile_kwargs(compile_mode: str, inductor: dict[str, Any] | None = None) -> dict:
    """torch.compile keyword arguments for a COMPILE_MODES name (a mode, or inductor options for ours), plus
    `inductor` (`--inductor` options, checked by `check_inductor_options`) over the mode's own options. torch.compile
    takes a mode or options, not both: with `inductor`, a torch mode is given as the options it stands for."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if compile_mode == "default":
        base: dict[str, Any] = {}
    elif compile_mode == "gemm-autotune":
        base = dict(GEMM_AUTOTUNE_OPTIONS)
    elif not inductor:
        return {"mode": compile_mode}
    else:
        from torch._inductor import list_mode_options

        base = dict(list_mode_options(compile_mode))
    options = {**base, **(inductor or {})}
    return {"options": options} if options else {}


def _inductor_value(key: str, text: str, declared: Any) -> Any:
    """An --inductor value read as the option's declared type (torch._inductor.config's annotation): bool (true/false,
    on/off, yes/no, 1/0), int, float, str, one of a Literal's values, or None where the type allows it ("none")."""
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is typing.Literal:
        for choice in args:
            if text == str(choice):
                return choice
        raise ValueError(f"--inductor {key}={text}: choose one of {', '.join(str(c) for c in args)}")
    if origin in (typing.Union, types.UnionType):
        kinds = [k for k in args if k is not type(None)]
        if type(None) in args and text.lower() == "none":
            return None
        if len(kinds) == 1:
            return _inductor_value(key, text, kinds[0])
    if declared is bool:
        try:
            return _parse_bool(text)
        except argparse.ArgumentTypeError:
            raise ValueError(f"--inductor {key}={text}: expected true or false") from None
    if declared in (int, float):
        try:
            return declared(text)
        except ValueError:
            raise ValueError(f"--inductor {key}={text}: expected {'an integer' if declared is int else 'a number'}"
                             ) from None
    if declared is str:
        return text
    raise ValueError(f"--inductor {key}: its type is {getattr(declared, '__name__', declared)}, which this flag cannot "
                     "give (only true/false, numbers, strings and named choices); set torch._inductor.config in your "
                     "own script instead")


def _declared_type(key: str, current: Any) -> Any:
    """The option's annotated type; the type of its current value where this torch's config cannot say."""
    import torch._inductor.config as inductor_config

    try:
        return inductor_config.get_type(key)
    except (AttributeError, KeyError):
        return type(current) if current is not None else str


def parse_inductor_options(items: list[str]) -> dict[str, Any]:
    """`--inductor KEY=VALUE` items -> Inductor options for torch.compile: KEY a torch._inductor.config name
    (sub-configs dotted: triton.cudagraphs), VALUE read as its declared type (`_inductor_value`), so the result
    passes `check_inductor_options`, which options built in code go through (`validate`). One-line ValueError."""
    if not items:
        return {}
    defaults = _inductor_defaults()
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--inductor {item!r}: expected KEY=VALUE, e.g. --inductor coordinate_descent_tuning=true")
        key, text = (part.strip() for part in item.split("=", 1))
        _check_key(key, defaults)
        out[key] = _inductor_value(key, text, _declared_type(key, defaults[key]))
    return out


def _inductor_defaults() -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    return inductor_config.get_config_copy()


def _did_you_mean(word: str, known) -> str:
    """' (did you mean X?)' for the known name closest to a mistyped `word`, or ''."""
    import difflib

    near = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def _check_key(key: str, defaults: dict[str, Any]) -> None:
    if key not in defaults:
        import torch

        raise ValueError(f"--inductor {key}: not an Inductor option of torch {torch.__version__} (names: "
                         f"torch._inductor.config){_did_you_mean(key, defaults)}")


def check_inductor_options(options: dict[str, Any]) -> None:
    """Every key an Inductor option of this torch, every value of a type torch.compile accepts for it (its own
    check, run now on a trivial function: nothing is compiled). One-line ValueError naming the option."""
    if not options:
        return
    import torch

    defaults = _inductor_defaults()
    for key in options:
        _check_key(key, defaults)
    try:
        torch.compile(_identity, options=dict(options))
    except RuntimeError as e:  # "Unexpected type of attr X, got int should be bool"
        raise ValueError(f"--inductor: {str(e).splitlines()[0]}") from None


def inductor_text(options: dict[str, Any]) -> list[str]:
    """Inductor options as the KEY=VALUE words that give them (CSV cells, notes, chart labels)."""
    return [f"{k}={v}" for k, v in options.items()]


def _identity(x):
    return x


_SECTIONS = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig}
_CHOICES = {
    "precision": ("bf16", "fp16", "no"),
    "compile": ("off", "block", "step"),
    "compile_mode": COMPILE_MODES,
    "epoch_mode": ("exact", "resampled"),
    "on_error": ("warn", "raise"),
}
_HELP = {
    "shards": "shard set: a make-shards directory, a brace pattern, URLs/pipe: commands, or synthetic:N",
    "out": "run directory (checkpoints, TensorBoard, resolved config, exported encoder)",
    "preset": "model preset: matpac | matpac_plusplus | m2d | tiny",
    "frontend": "front end the shards must have been made with: matpac | m2d",
    "batch_size": "samples per process (device) per micro-step; the global batch is this x processes x --grad-accum",
    "epochs": "epochs that the lr / EMA / tau_t / MATPAC++ temperature schedules span",
    "max_steps": "stop after this many optimizer steps (0: run all epochs)",
    "compile": "torch.compile: off, block (each transformer block), step (the whole forward)",
    "compile_mode": "torch.compile mode: default, reduce-overhead (CUDA graphs: fewer launches, more memory), "
    "max-autotune-no-cudagraphs (GEMM and kernel autotuning, minutes of compilation) or gemm-autotune (ours: CUDA "
    "graphs plus GEMM autotuning only, so that Triton GEMMs can fuse bias/GELU epilogues; on an H200 its compile of "
    "the ViT-B step took over 4 minutes, so its speed is unmeasured)",
    "kernels": "use the Triton kernels (fused patchify-gather and centred softmax cross-entropy)",
    "resume": "'auto' resumes from the latest checkpoint in --out, or give a checkpoint directory (an earlier one "
    "only once the later checkpoints are moved out of --out/checkpoints)",
    "ckpt_every": "checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGINT)",
    "ema_reference_batch": "EMA decays are for this global batch; rho becomes rho**(batch/ref); 0 uses them as given",
    "mcl_reference_steps": "MATPAC++ temperature 0.1*0.99997^step is the authors' curve over this many updates (their "
    "294,816): a run of N steps uses step*ref/N, keeping the soft-to-hard switch at 78 %% of training; 0: raw steps",
    "max_nonfinite": "abort after this many consecutive non-finite losses (each such step is skipped)",
    "peak_tflops": "peak dense TFLOP/s of one device for MFU (0: look the GPU up in a table)",
    "seed": "seed of initialisation, data order, crops and masks (identical on every rank)",
    "precision": "autocast precision: bf16 (no scaler), fp16 (with a GradScaler) or no (fp32)",
    "workers": "loader worker processes per rank",
    "epoch_mode": "exact: each sample once per epoch across ranks; resampled: shards drawn with replacement",
    "on_error": "corrupt or missing shard: warn, count and skip it, or raise",
    "data_timeout": "seconds the loader workers may take for one batch before the run stops with an error naming "
    "the stall (a pipe: command or URL that stopped sending would hang it forever; with several processes the others "
    "wait in a collective); 0: no limit; --workers 0 reads in-process, without a limit",
    "lr": "peak learning rate, absolute (not scaled by batch)",
    "warmup_epochs": "linear lr warm-up, then cosine to 0",
    "clip_grad": "gradient-norm clip (0 disables)",
    "grad_accum": "micro-batches per optimizer step (an epoch's last batches that cannot fill a step are not read)",
    "tau_t_warmup_epochs": "teacher temperature rises linearly over these epochs (end-points: --model tau_t_start/end)",
    "log_every": "optimizer steps between log rows: history.jsonl, TensorBoard and the progress bar's figures, not "
    "printed as lines (a host synchronisation); with several processes also the most steps between "
    "two agreements on a SIGTERM/Ctrl-C stop (they agree about every 5 s)",
    "keep_last": "completed checkpoints to keep",
    "cpu": "force CPU even when a GPU is present",
    "deterministic": "torch.use_deterministic_algorithms (warn only)",
    "progress": "show the progress bar (stderr); false prints nothing until the final done: line (log rows still go "
    "to history.jsonl and TensorBoard)",
}


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _prog() -> str:
    """The name the user typed: `train.py` (python train.py, torchrun, accelerate launch) or the `matpac-train` console
    script; anything else (python -m, a test runner) reads as matpac-train."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("train.py", "matpac-train") else "matpac-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description=(
            "Pre-train a MATPAC / M2D / MATPAC++ audio encoder. Run with `accelerate launch train.py ...` for "
            "multi-GPU (see configs/), or `python train.py ...` for one device. Defaults reproduce the paper's "
            "recipe (METHOD.md §5); --recipe tiny is the CPU demo."
        ),
        epilog="Defaults shown are the paper recipe's; --recipe tiny changes some of them (see --print-config).",
    )
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="named defaults to start from: paper (METHOD.md §5, for GPUs) or tiny (CPU-sized) "
                   "(default: paper)")
    p.add_argument("--config", metavar="FILE", type=path_arg,
                   help="start from the settings in FILE, a JSON file: a --print-config output, a run's "
                   "config.json, or any part of either (e.g. {\"optim\": {\"lr\": 1e-4}}); the flags given here "
                   "override it, and --recipe's defaults fill what it leaves out. A --print-config output pins the "
                   "model fields it shows that differ from its preset (an m2d run's normalisation pair from its "
                   "shards' stats.json among them); a \"model\" that names no preset (hand-written) and a run's "
                   "config.json keep their --model options as given. A "
                   "file's resume setting is not read: give --resume each time")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ModelConfig field (repeatable), e.g. --model alpha=1.0 --model center_mode=logit",
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a torch.compile Inductor option (repeatable; names as in torch._inductor.config, sub-configs dotted), "
        "added to --compile-mode's, e.g. --inductor coordinate_descent_tuning=true; with --compile off, none applies",
    )
    p.add_argument("--print-config", action="store_true",
                   help="go through a run's start-up checks (options, --out, the checkpoint to resume, the shard "
                   "set's front end and batch count, the model; a remote set is not fetched; a GPU-only setting "
                   "without a GPU is a note), print the resolved config (every model field) as JSON and exit; "
                   "nothing is written")
    for section, cls in _SECTIONS.items():
        g = p.add_argument_group(section)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            paper = getattr(cls(), f.name)
            text = _HELP.get(f.name, f.name.replace("_", " "))
            kw: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": None,  # None = keep the recipe's value
                "help": f"{text} (default: {paper!r})" if paper != "" else text,
                "metavar": f.name.upper(),
            }
            if f.type in ("bool", bool):
                kw.update(type=_parse_bool, metavar="BOOL")
            else:
                kw["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
            if f.name in _CHOICES:
                kw.pop("metavar")
                kw["choices"] = _CHOICES[f.name]
            g.add_argument(flag, **kw)
    return p


def _coerce(value: str, like: Any):
    if isinstance(like, bool):
        return _parse_bool(value)
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, (tuple, list)):
        return type(like)(json.loads(value))
    return value


def parse_model_overrides(items: list[str]) -> dict[str, Any]:
    from matpac_fast.config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model {item!r}: expected KEY=VALUE, e.g. --model alpha=1.0")
        k, v = item.split("=", 1)
        if k not in fields:
            raise ValueError(f"--model {k}: unknown model field; known: {', '.join(sorted(fields))}")
        if k == "name":  # the preset's own name is accepted (as in a config file); model_config checks it
            out[k] = v
            continue
        default = fields[k].default
        try:
            out[k] = _coerce(v, default) if default is not dataclasses.MISSING else v
        except argparse.ArgumentTypeError:  # _parse_bool
            raise ValueError(f"--model {k}={v}: expected true/false") from None
        except (ValueError, json.JSONDecodeError):
            raise ValueError(f"--model {k}={v}: expected a value like {default!r}") from None
    return out


def _name_is_preset(name: str) -> str:
    from matpac_fast.config import PRESETS

    use = f"use --preset {name}" if name in PRESETS else f"use --preset with one of {', '.join(sorted(PRESETS))}"
    return f"--model name={name}: the model's name is its preset: {use}"


def model_config(cfg: TrainConfig, stats: dict | None = None):
    """The ModelConfig a run of `cfg` trains: the --preset, then the --model overrides, the front end's normalisation
    pair (M2D: the shard set's dataset mean / std, from `stats`, when it has them) and --kernels. Without `stats` (the
    shards not read) an M2D front end keeps its fallback pair. One-line ValueError naming the option."""
    from matpac_fast.config import PRESETS, get_model_config
    from matpac_fast.frontend import get_spec

    preset = cfg.run.preset
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    overrides = dict(cfg.model)
    name = overrides.pop("name", preset)  # a resolved config (--print-config's output) carries its preset's name
    if name != get_model_config(preset).name:
        raise ValueError(_name_is_preset(name))
    spec = get_spec(cfg.run.frontend)
    mean, std = spec.norm_mean, spec.norm_std
    stats = stats or {}
    if spec.name == "m2d" and "mean" in stats:  # M2D normalises with dataset statistics (METHOD.md §1)
        mean, std = float(stats["mean"]), float(stats["std"])
        if not std > 0:
            raise ValueError(f"the shard set's stats.json has std {std}: M2D's normalisation divides by it; re-make "
                             "the set with make-shards")
    overrides.setdefault("norm_mean", mean)
    overrides.setdefault("norm_std", std)
    overrides.setdefault("use_kernels", cfg.run.kernels)
    try:
        return get_model_config(preset, **overrides)
    except TypeError as e:
        raise ValueError(f"--model: {e}") from None
    except ValueError as e:
        raise ValueError(f"--model {str(e).removeprefix('ModelConfig: ')}") from None


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Command line -> TrainConfig (recipe defaults, then explicit flags). Returns (config, print_only)."""
    cfg, args = resolve_args(argv)
    return cfg, args.print_config


def resolve_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """As `resolve`, returning the parsed arguments (the recipe's name, --print-config) beside the config."""
    args = build_parser().parse_args(argv)
    cfg = TrainConfig.from_dict(json.loads(json.dumps(RECIPES[args.recipe])))
    if args.config is not None:  # the recipe's defaults, then the file, then the flags
        given = read_config_file(args.config, cfg)
        for section in _SECTIONS:
            for name, value in given.get(section, {}).items():
                setattr(getattr(cfg, section), name, value)
        cfg.model.update(given.get("model", {}))
        cfg.inductor.update(given.get("inductor", {}))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    cfg.model.update(parse_model_overrides(args.model))
    cfg.inductor.update(parse_inductor_options(args.inductor))
    validate(cfg)
    return cfg, args


def _kind_fits(value: Any, like: Any) -> bool:
    """A config file's `value` has the JSON kind of a field whose default is `like` (an integer for a float field is
    fine: JSON writes 1e-3 and 1 alike; a float for an integer field, a text for a number, a number for a flag not)."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    if isinstance(like, int):
        return isinstance(value, int)
    return isinstance(value, type(like))


def _kind_name(like: Any) -> str:
    return "an integer" if isinstance(like, int) and not isinstance(like, bool) else json_kind(like)


def _setting(where: str, key: str, value: Any, like: Any) -> Any:
    """A config file's `value` for the setting `key` whose default is `like`, checked (`_kind_fits`): an integer for a
    float setting becomes a float, as a flag's value would (JSON's 1 for 1.0; one of 400 digits, which float settings
    took as an int and which failed as a traceback where first used as a float, is a one-line error)."""
    if not _kind_fits(value, like):
        raise ValueError(f"{where}: {key} is {json.dumps(value)[:40]} ({json_kind(value) or 'null'}), not "
                         f"{_kind_name(like)} like {like!r}")
    if isinstance(like, float) and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{where}: {key} is {json.dumps(value)[:40]}..., too large for a number") from None
    return value


def _unknown(where: str, key: str, known) -> ValueError:
    hint = _did_you_mean(key.rsplit(".", 1)[-1], known)
    return ValueError(f"{where}: {key} is not a setting of matpac-train{hint}; fix or remove it")


def read_config_file(path: str | os.PathLike, base: TrainConfig | None = None) -> dict:
    """--config FILE: the settings of a `--print-config` output ({"run": .., "data": .., "optim": .., "schedule": ..,
    "model": every model field, "inductor": ..}), of a run's config.json ({"train": that layout with "model" holding
    the --model options, "model": every model field}) or of any part of either, as a partial TrainConfig dict. `base`:
    the recipe's config the file's values go over (its preset and front end apply where the file names none). The
    file's run.resume is not read: --resume is given on the command line each time.

    A --print-config output lists every model field: only those that differ from its preset (its front end's
    normalisation pair, its --kernels) are kept as --model options, so that the file's preset and a flag given with
    it (--kernels) still decide the rest; a "model" in a file that names no preset (no run.preset, no model.name: one
    written by hand) is kept whole. A run's config.json is read from its "train" part: the options as given.
    Anything else (not JSON, an unknown section or setting, a value of the wrong kind) is a one-line ValueError
    naming the file and the setting."""
    from matpac_fast.config import ModelConfig, get_model_config
    from matpac_fast.frontend import get_spec
    from matpac_fast.safe_files import JSON_MAX_BYTES, TooLarge, read_regular

    where = f"--config {path}"
    try:
        d = json.loads(read_regular(path, JSON_MAX_BYTES))
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except TooLarge as e:
        raise ValueError(f"{where}: {e.strerror}: not a config file") from None
    except IsADirectoryError:
        inside = Path(path) / "config.json"
        hint = f": give its config.json ({inside})" if inside.is_file() else "; give a JSON file"
        raise ValueError(f"{where}: is a folder{hint}") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e}); give a JSON file") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a number of over 4,300 digits (int's own limit)
        raise ValueError(f"{where}: not a JSON file ({e}); give a --print-config output or a run's config.json"
                         ) from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to be a config file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: holds {json_kind(d) or 'null'}, not an object of settings such as "
                         '{"optim": {"lr": 0.0003}}')
    resolved_model = "train" not in d
    if not resolved_model:  # a run's config.json: "train" is the config as given, "model" the resolved fields
        d = d["train"]
        if not isinstance(d, dict):
            raise ValueError(f'{where}: its "train" is {json_kind(d) or "null"}, not the run\'s settings')
    known = (*_SECTIONS, "model", "inductor")
    for section in d:
        if section not in known:
            raise ValueError(f"{where}: {section!r} is not a section of matpac-train's config"
                             f"{_did_you_mean(section, known)}; the sections are {', '.join(known)}")
    for section, values in d.items():
        if not isinstance(values, dict):
            raise ValueError(f'{where}: "{section}" is {json_kind(values) or "null"}, not an object of settings')
    out: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        out[section] = {}
        for name, value in d.get(section, {}).items():
            if name not in defaults:
                raise _unknown(where, f"{section}.{name}", defaults)
            out[section][name] = _setting(where, f"{section}.{name}", value, defaults[name])
    # --resume is what this command does, not a setting of the run: a resumed run's config.json says "auto", or the
    # checkpoint it resumed, which a new run started from that file would have resumed in turn
    out["run"].pop("resume", None)
    model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model = {}
    for name, value in d.get("model", {}).items():
        if name not in model_defaults:
            raise _unknown(where, f"model.{name}", model_defaults)
        model[name] = _setting(where, f"model.{name}", value, model_defaults[name])
    base = base or TrainConfig()
    run = {**dataclasses.asdict(base.run), **out.get("run", {})}
    # Only a file that names its preset (a --print-config output does, twice) shows fields its preset implies: a
    # "model" written by hand, with no preset named, is kept as given, as --model would be (its alpha 0.5 was dropped
    # for equalling the recipe's matpac preset's, and --preset m2d then trained with alpha 1).
    names_preset = "preset" in out["run"] or "name" in model
    if resolved_model and model and names_preset:  # keep what differs from the file's preset, front end, --kernels
        from matpac_fast.config import PRESETS

        preset = run["preset"]
        if preset in PRESETS and run["frontend"] in ("matpac", "m2d"):
            spec = get_spec(run["frontend"])
            # ... and from the recipe's --model defaults, which would otherwise take a dropped field's place (the
            # tiny recipe's ema_start 0.99 over a file's 0.99995, the tiny preset's own value)
            implied = {**get_model_config(preset).to_dict(), "norm_mean": spec.norm_mean, "norm_std": spec.norm_std,
                       "use_kernels": run["kernels"], **base.model}
            model = {k: v for k, v in model.items() if v != implied[k]}
    out["model"] = model
    out["inductor"] = dict(d.get("inductor", {}))  # checked by validate (check_inductor_options)
    return out


def validate(cfg: TrainConfig) -> None:
    """Bad values are one-line errors naming the option."""
    checks = [
        (cfg.data.shards != "", "--shards is required: a make-shards output directory, a pattern, or synthetic:N"),
        (cfg.data.batch_size > 0, "--batch-size must be > 0"),
        (cfg.data.workers >= 0, "--workers must be >= 0"),
        (cfg.data.data_timeout >= 0, f"--data-timeout must be >= 0 s, 0 = none (got {cfg.data.data_timeout:g})"),
        (cfg.optim.lr > 0, "--lr must be > 0"),
        (cfg.optim.grad_accum >= 1, "--grad-accum must be >= 1"),
        (cfg.optim.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)"),
        (cfg.schedule.epochs > 0, f"--epochs must be > 0 (got {cfg.schedule.epochs:g})"),
        # The schedules are precomputed per step: 1e12 epochs hung building them; the paper trains 300.
        (cfg.schedule.epochs <= MAX_EPOCHS, f"--epochs must be <= {MAX_EPOCHS:g} (got {cfg.schedule.epochs:g})"),
        (0 <= cfg.optim.warmup_epochs <= cfg.schedule.epochs,
         f"--warmup-epochs must be within [0, --epochs] (got {cfg.optim.warmup_epochs:g} and {cfg.schedule.epochs:g})"),
        (cfg.schedule.max_steps >= 0, "--max-steps must be >= 0"),
        (cfg.run.log_every >= 1, "--log-every must be >= 1"),
        (cfg.run.ckpt_every >= 0, "--ckpt-every must be >= 0"),
        (cfg.run.keep_last >= 1, "--keep-last must be >= 1"),
        (cfg.run.max_nonfinite >= 1, "--max-nonfinite must be >= 1"),
        (cfg.run.frontend in ("matpac", "m2d"), "--frontend must be matpac or m2d"),
        (isinstance(cfg.run.seed, int) and 0 <= cfg.run.seed <= 2**32 - 1,
         f"--seed must be between 0 and {2**32 - 1} (2**32 - 1), got {cfg.run.seed}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    from matpac_fast.data import MAX_TIMEOUT_S

    if not cfg.data.data_timeout <= MAX_TIMEOUT_S:  # inf crashed the first batch, after --out was written
        raise ValueError(f"--data-timeout must be at most {MAX_TIMEOUT_S:g} s (got {cfg.data.data_timeout:g}); 0 "
                         "means no limit")
    for section in (cfg.run, cfg.data):  # argparse checks choices; a TrainConfig built in code is checked here
        for name, allowed in _CHOICES.items():
            value = getattr(section, name, None)
            if value is not None and value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")
    for section in (cfg.optim, cfg.schedule, cfg.run):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
    o = cfg.optim
    optim_checks = [
        (o.eps > 0, f"--eps must be > 0 (got {o.eps}): AdamW divides by sqrt(v) + eps; the recipe uses 1e-6"),
        (0 <= o.beta1 < 1, f"--beta1 must be in [0, 1) (got {o.beta1})"),
        (0 <= o.beta2 < 1, f"--beta2 must be in [0, 1) (got {o.beta2})"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0 (got {o.weight_decay})"),
        (0 <= cfg.schedule.tau_t_warmup_epochs <= MAX_EPOCHS,
         f"--tau-t-warmup-epochs must be within [0, {MAX_EPOCHS:g}] (got {cfg.schedule.tau_t_warmup_epochs:g})"),
        (cfg.schedule.ema_reference_batch >= 0, "--ema-reference-batch must be >= 0 (0: decays as given)"),
        (cfg.schedule.mcl_reference_steps >= 0, "--mcl-reference-steps must be >= 0 (0: raw optimizer steps)"),
        (cfg.run.peak_tflops >= 0, "--peak-tflops must be >= 0 (0: look the device up)"),
    ]
    for ok, msg in optim_checks:
        if not ok:
            raise ValueError(msg)
    shards = cfg.data.shards
    local = (not shards.startswith(("synthetic:", "pipe:")) and "://" not in shards
             and not any(c in shards for c in "{*?["))  # patterns are expanded (and checked) by ShardSource.open
    if local and not Path(shards).exists():
        raise ValueError(f"--shards {shards}: no such directory or shard file; make one with make-shards")
    check_inductor_options(cfg.inductor)
    model_config(cfg)  # --preset and the --model fields (the shards' statistics are checked when they are read)


MAX_EPOCHS = 100_000.0

# Settings that may change when a run is resumed: cadence, display and implementation switches that change the numbers
# by float rounding at most, plus the two a user changes on purpose to recover from a divergence (a lower --lr, a
# tighter --clip-grad: the usual "resume from the last good checkpoint with a smaller step"). Every other setting
# must match the checkpoint's, or the resumed run would not continue the interrupted one (a new batch size or worker
# count reads a different in-epoch position, a new seed another order, new epochs other schedules, a new model other
# shapes). `data.shards` is compared by content (shard names and sizes), not by path. Model fields are the resolved
# ModelConfig's. The "resumed from ..." line lists every free change made.
RESUME_FREE = frozenset({
    "run.out", "run.resume", "run.log_every", "run.ckpt_every", "run.keep_last", "run.progress", "run.max_nonfinite",
    "run.peak_tflops", "run.compile", "run.compile_mode", "run.kernels", "run.cpu", "run.deterministic",
    "schedule.max_steps", "data.on_error", "data.data_timeout", "data.shards", "optim.lr", "optim.clip_grad",
    "model.use_kernels", "model.attn_impl", "model.stream_dtype",
})


def _flag(key: str) -> str:
    section, name = key.split(".", 1)
    return f"--model {name}" if section == "model" else "--" + name.replace("_", "-")


# Fields added later whose absence from a saved config means a behaviour of today's field: older runs read the
# MATPAC++ temperature on raw steps (= 0), so resuming one under the new default is a change, not a silent one.
_BEFORE_THE_FIELD = {"schedule.mcl_reference_steps": 0}


def _flat(d: dict) -> dict:
    return {f"{section}.{k}": v for section in _SECTIONS for k, v in d.get(section, {}).items()}


def _compared(key: str, value):
    """The value a resume compares: 0 workers reads like 1 (the loader splits an epoch over max(workers, 1))."""
    return max(int(value), 1) if key == "data.workers" else value


def json_kind(value) -> str | None:
    """The JSON kind of a setting (None for null, which an optional setting may hold whatever its kind)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number" if math.isfinite(value) else "a non-finite number"
    return {str: "a text", list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def mistyped(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) of each setting a checkpoint holds as another JSON kind than this run
    (`saved` / `new` as for resume_changes): a hand-edited "8" for 8, a list, a NaN. resume_changes compared them
    as values: "--batch-size 8 -> 8", or a bare "invalid literal for int()"."""
    a, b = _flat(saved), _flat(new)
    a.update({f"model.{k}": v for k, v in saved.get("model", {}).items()})
    b.update({f"model.{k}": v for k, v in new.get("model", {}).items()})
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b))
            if None not in (json_kind(a[k]), json_kind(b[k])) and json_kind(a[k]) != json_kind(b[k])]


def resume_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's settings with this run's: (blocking, free) lists of "--flag old -> new".

    `saved` / `new`: {"run": ..., "data": ..., "optim": ..., "schedule": ..., "model": {resolved ModelConfig}}
    (TrainConfig.to_dict() with "model" replaced by the resolved model fields). A key missing from `saved` (a
    checkpoint from an older version) is not compared, except where the older version behaved as a value of today's
    field (_BEFORE_THE_FIELD): then it is that value."""
    a, b = _flat(saved), _flat(new)
    for key, value in _BEFORE_THE_FIELD.items():
        if saved.get(key.split(".")[0]) is not None:
            a.setdefault(key, value)
    a.update({f"model.{k}": v for k, v in saved.get("model", {}).items()})
    b.update({f"model.{k}": v for k, v in new.get("model", {}).items()})
    blocking, free = [], []
    for key in sorted(set(a) & set(b), key=lambda k: (k.startswith("model."), k)):  # the preset before its fields
        old, cur = a[key], b[key]  # shown as given: a --workers 0 checkpoint said "--workers 1 -> 2"
        x, y = _compared(key, old), _compared(key, cur)
        if x == y or (isinstance(x, (list, tuple)) and list(x) == list(y)):
            continue
        (free if key in RESUME_FREE else blocking).append(f"{_flag(key)} {old} -> {cur}")
    # Inductor options change how the step is compiled (float rounding at most), never what it computes: free. A
    # checkpoint from before --inductor had none.
    old_opts, new_opts = saved.get("inductor") or {}, new.get("inductor") or {}
    if old_opts != new_opts:
        free.append(f"--inductor {' '.join(inductor_text(old_opts)) or '(none)'} -> "
                    f"{' '.join(inductor_text(new_opts)) or '(none)'}")
    return blocking, free
