"""Write the tuning grids of issue #29: every method the same budget (tune_v2/*.yaml, one file per setting),
run on MNIST-10k (tune_v2.yaml) and on CIFAR-10 (tune_cifar10.yaml), each on its own validation splits.

The learning rate in {0.003, 0.01, 0.03, 0.1, 0.3, 1.0} for every method (1.0 added when FedEM chose 0.3,
the grid's end then), and at most one method-specific knob
with at most three values (FedCoE's inferred switches are fixed a priori; its assignment is its
knob, counted like FedProx's mu); seeds 1 and 4 (the tables report 0, 2, 3); 50 rounds; the
selection reads val_personal_acc only, and a setting with a diverged run is out. The core rates run
first (*_core.yaml); *_widen_dir<alpha>.yaml then add an outer rate only where a choice sits at an
edge, read from the committed records. Once every group has chosen, it exports the chosen settings
(mnist10k_v2/) and writes the sweeps of the tables that run them at the test seeds (mnist10k_v2.yaml,
mnist10k_v2_shift.yaml, FedCoE's ablation mnist10k_v2_ablation.yaml). Run from the repository root
to regenerate the files (again after each batch of records): python benchmarks/sweeps/make_tuning.py
"""

import os
from pathlib import Path

import yaml

from fedcoe_bench.sweep import SweepRun, plan
from fedcoe_bench.tuning import Selection, export_selection, learning_rate, select

LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # 1.0: FedEM chose 0.3 at Dirichlet 0.3
CORE_LRS = (0.01, 0.03, 0.1)  # run first; an edge value chosen here is what the outer values decide
METHODS = {  # cheapest first; short name -> (class path, knob, values)
    "fedavg": ("fedcoe_bench.baselines.fedavg.FedAvg", None, ()),
    "local": ("fedcoe_bench.baselines.local.Local", None, ()),
    "fedper": ("fedcoe_bench.baselines.fedper.FedPer", None, ()),
    # None: the method's default (momentum 0.9, every method's), no suffix; 0.0: plain SGD, the paper's optimizer
    "scaffold": ("fedcoe_bench.baselines.scaffold.SCAFFOLD", "momentum", (None, 0.0)),
    "fedprox": ("fedcoe_bench.baselines.fedprox.FedProx", "mu", (0.001, 0.01, 0.1)),
    "fedrep": ("fedcoe_bench.baselines.fedrep.FedRep", "head_share", (0.25, 0.5, 0.75)),
    "ditto": ("fedcoe_bench.baselines.ditto.Ditto", "lam", (0.1, 0.5, 1.0)),
    "pfedmoe": ("fedcoe_bench.baselines.pfedmoe.PFedMoE", None, ()),
    "ifca": ("fedcoe_bench.baselines.ifca.IFCA", "num_experts", (2, 4)),
    "fedem": ("fedcoe_bench.baselines.fedem.FedEM", "num_experts", (2, 4)),
    "fedmix": ("fedcoe_bench.baselines.fedmix.FedMix", "num_experts", (2, 4)),
    "ensemble": ("fedcoe_bench.baselines.ensemble.Ensemble", None, ()),  # K = 4, FedCoE's: the capacity control
    # gate: the paper's reading; soft: the default; relative: the one rule that sorted the rotation clusters
    # (hard, in the grid until no FedCoE run had been made, lost to relative on the rotation clusters'
    # validation splits and collapsed at lr 0.3: benchmarks/results/mnist10k_ablation.md)
    "fedcoe": ("fedcoe_bench.fedcoe.FedCoE", "assignment", ("gate", "soft", "relative")),
}
HERE = Path(__file__).parent
# FedCoE's switches (fedcoe_variants/<name>.yaml), each off alone at the chosen settings; the last two change
# predictions only (``fedbench eval`` makes them from the main table's runs, which the sweep then finds finished)
SWITCHES = ("no_coordination", "no_shared_gate", "no_local_level", "no_expert_loss", "spec", "no_cold_start_prior",
            "beta_adaptive")
FT_LRS = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03]  # `+ ft`'s step sizes, one chosen on validation (results/mnist10k.md)
TABLES = {  # tuning -> (the tables' name, main table's base config, rounds, shift table's base config)
    "tune_v2": ("mnist10k_v2", "benchmarks/mnist10k_dir0.3.yaml", 100, "benchmarks/mnist10k_shift.yaml"),
    "tune_cifar10": ("cifar10_v2", "benchmarks/cifar10_dir0.1.yaml", 20, None),  # the JPEG copy: its root is in each export
}
RECORDS = Path("benchmarks/results/runs")  # committed run records, one folder per tuning sweep (run from the repo root)


BENCHMARKS = {  # sweep file -> (base config, alphas, rounds, other fixed parameters)
    "tune_v2": ("benchmarks/mnist10k_dir0.3.yaml", [0.1, 0.3], 50, {}),
    # CIFAR-10 (JPEG copy) is tuned on its own validation splits with the same settings, at half its
    # table's 20 rounds, as benchmarks/cifar10_dir0.1.yaml's cost estimate plans
    "tune_cifar10": ("benchmarks/cifar10_dir0.1.yaml", [0.1, 0.5], 10, {"data.source.root": "../shared/data/cifar10-jpeg"}),
}


def setting_name(method: str, lr: float, value=None) -> str:
    knob = METHODS[method][1]
    return f"{method}-lr{lr}" + (f"-{knob.replace('_', '')}{value}" if knob is not None and value is not None else "")


def setting_file(method: str, lr: float, value=None) -> str:
    return f"benchmarks/sweeps/tune_v2/{setting_name(method, lr, value)}.yaml"


def write_settings(folder: Path) -> tuple[list[str], list[str]]:
    """One small config file per setting (name + method); the sweeps of every benchmark list them."""
    folder.mkdir(exist_ok=True)
    files, core = [], []
    for method, (path, knob, values) in METHODS.items():
        for lr in LRS:
            for value in values or (None,):
                named = knob is not None and value is not None
                name = setting_name(method, lr, value)
                args = {"lr": lr, **({knob: value} if named else {})}
                (folder / f"{name}.yaml").write_text(
                    f"# tune_v2.yaml: {method} at lr {lr}" + (f", {knob} {value}" if named else "") + "\n"
                    + yaml.safe_dump({"name": name, "method": {"class_path": path, "init_args": args}}, sort_keys=False))
                files.append(setting_file(method, lr, value))
                if lr in CORE_LRS:
                    core.append(files[-1])
    return files, core


def widening(selections: list[Selection]) -> tuple[dict[float, list[str]], list[str]]:
    """Per alpha, every setting of a method at the next learning rate past the one it chose at an end of
    the rates it tried (its knob at each of its values), and the groups already at an end of LRS.

    The grid is widened only where a choice sits at its edge: on 2 cores the full grid's outer rates
    take a session, and a rate beyond the far side of an inner choice would have to beat the rate
    between them to change anything.

    >>> chosen = SweepRun(0, {}, [], Path(), {"method": {"init_args": {"lr": 0.1}}})
    >>> widen, beyond = widening([Selection(("mnist10k", "dirichlet", 0.3, 50, "ifca"), {}, 96.7, [chosen], 6,
    ...                                     lr_edge="highest")])
    >>> widen, beyond
    ({0.3: ['benchmarks/sweeps/tune_v2/ifca-lr0.3-numexperts2.yaml', 'benchmarks/sweeps/tune_v2/ifca-lr0.3-numexperts4.yaml']}, [])
    """
    widen, beyond = {}, []
    for s in selections:
        if not s.lr_edge:
            continue
        *_, alpha, _, method = s.group
        i = LRS.index(learning_rate(s.runs[0])) + (1 if s.lr_edge == "highest" else -1)
        if not 0 <= i < len(LRS):
            beyond.append(f"{method} at alpha {alpha}: lr {learning_rate(s.runs[0])}, the {s.lr_edge} of LRS")
            continue
        widen.setdefault(alpha, []).extend(setting_file(method, LRS[i], v) for v in METHODS[method][2] or (None,))
    return widen, beyond


def widened(stem: str, records: Path) -> tuple[dict[float, list[str]], list[str], list[Selection]]:
    """Widen the core one step at a time (:func:`widening`), choosing each time over the core and the
    steps so far, while the runs of a step are made (finished or diverged) in ``records``: every rate
    a choice has called for, per alpha, the groups already at an end of LRS, and the last choice."""
    sweep = yaml.safe_load((HERE / f"{stem}.yaml").read_text())
    metric = sweep["metric"]["name"], sweep["metric"]["goal"]
    planned: dict[tuple, list[SweepRun]] = {}
    whole = plan(HERE / f"{stem}.yaml", records)
    for r in whole:
        planned.setdefault((r.params["config"], r.config["data"]["alpha"]), []).append(r)
    runs, widen = [r for r in whole if learning_rate(r) in CORE_LRS], {}  # {stem}_core.yaml's runs, planned once
    # Ends: each pass adds settings not added before, or returns; a group with a step's runs still to
    # make chooses nothing (select), so it has no edge and widens no further until they are made.
    while True:
        selections = select(runs, *metric)
        step, beyond = widening(selections)
        new = [(alpha, f) for alpha, files in step.items() for f in files if f not in widen.get(alpha, [])]
        if not new:
            return widen, beyond, selections
        for alpha, f in new:
            widen.setdefault(alpha, []).append(f)
            runs += planned[(f, alpha)]


def write_sweeps(stem: str, base: str, alphas: list[float], rounds: int, fixed: dict, files: list[str], core: list[str]) -> None:
    sweep = {"name": stem.replace("_", "-"), "project": "fedcoe-bench", "program": "fedbench", "method": "grid",
             "metric": {"name": "val_personal_acc", "goal": "maximize"},
             "command": ["fedbench", "fit", "--config", base, "--logger", "wandb", "${args}"],
             # one method's runs together, cheapest method first: a method is complete before the next starts
             "parameters": {**{k: {"value": v} for k, v in fixed.items()},
                            "config": {"values": files}, "data.alpha": {"values": alphas},
                            "seed": {"values": [1, 4]}, "loop.rounds": {"value": rounds}}}
    runs = 2 * len(alphas)
    header = (f"# Issue #29's tuning protocol on {base}: {len(files)} settings x {len(alphas)} alphas x seeds 1 and 4 = "
              f"{runs * len(files)} runs of {rounds} rounds (written by make_tuning.py; every method: lr in {list(LRS)}, "
              f"at most one knob of at most three values).\n# On 2 cores:\n#   for i in 1 2; do OMP_NUM_THREADS=1 "
              f"fedbench sweep benchmarks/sweeps/{stem}.yaml --sweep_dir runs/tune & done; wait\n")
    (HERE / f"{stem}.yaml").write_text(header + yaml.safe_dump(sweep, sort_keys=False))

    # The same runs (same names, same run directories) at the core learning rates only: on 2 cores the
    # whole grid takes several sessions, and the core shows early which methods choose an edge rate.
    staged = {**sweep, "name": f"{sweep['name']}-core", "parameters": {**sweep["parameters"], "config": {"values": core}}}
    (HERE / f"{stem}_core.yaml").write_text(
        f"# {stem}.yaml's runs at lr {list(CORE_LRS)} ({runs * len(core)} runs), one method after another in the "
        f"order of their cost (written by make_tuning.py).\n# Same run directories as {stem}.yaml: run this "
        f"first; make_tuning.py then writes {stem}_widen_dir<alpha>.yaml, the outer rates its choices call for.\n# On 2 cores:\n#   for i in 1 2; do "
        f"OMP_NUM_THREADS=1 fedbench sweep benchmarks/sweeps/{stem}_core.yaml --sweep_dir runs/tune & done; wait\n"
        + yaml.safe_dump(staged, sort_keys=False))


def write_widening(stem: str, records: Path) -> tuple[list[Selection], str]:
    """{stem}_widen_dir<alpha>.yaml: the next outer rates the records call for (see :func:`widening`);
    returns the choice so far and the metric it is made by."""
    sweep = yaml.safe_load((HERE / f"{stem}.yaml").read_text())
    widen, beyond, selections = widened(stem, records)
    for old in HERE.glob(f"{stem}_widen_dir*.yaml"):
        old.unlink()
    for alpha, files in widen.items():
        name = f"{stem}_widen_dir{alpha}"
        params = {**sweep["parameters"], "config": {"values": files}, "data.alpha": {"value": alpha}}
        (HERE / f"{name}.yaml").write_text(
            f"# {stem}.yaml's settings at the learning rates past the edge choices at Dirichlet {alpha}, read from "
            f"{records} (written by make_tuning.py;\n# run it again after these runs: a choice that moves to a new "
            f"rate widens once more).\n# The tuning is {stem}_core.yaml and these files, chosen as one; on 2 cores:\n"
            f"#   for i in 1 2; do OMP_NUM_THREADS=1 fedbench sweep benchmarks/sweeps/{stem}_core.yaml "
            f"benchmarks/sweeps/{stem}_widen_dir*.yaml --sweep_dir runs/tune & done; wait\n"
            + yaml.safe_dump({**sweep, "name": name.replace("_", "-"), "parameters": params}, sort_keys=False))
    for line in beyond:
        print(f"make_tuning: {line}: add the next rate to LRS")
    return selections, sweep["metric"]["name"]


def table_sweep(stem: str, base: str, configs: list[str], rounds: int, comment: str, fixed: dict | None = None) -> str:
    """A sweep running ``configs`` (each a setting given after ``base``, then the ``fixed`` overrides) at
    the test seeds, every new client's `+ ft` step size chosen on validation from FT_LRS."""
    sweep = {"name": stem.replace("_", "-"), "project": "fedcoe-bench", "program": "fedbench", "method": "grid",
             "metric": {"name": "personal_acc", "goal": "maximize"},
             "command": ["fedbench", "fit", "--config", base, "--logger", "wandb", "${args}"],
             "parameters": {"seed": {"values": [0, 2, 3]}, "config": {"values": configs},
                            **{key: {"value": value} for key, value in (fixed or {}).items()},
                            "loop.rounds": {"value": rounds}, "loop.cold_start_lr": {"value": FT_LRS}}}
    return (f"# {comment} (written by make_tuning.py).\n# On 2 cores:\n#   for i in 1 2; do OMP_NUM_THREADS=1 "
            f"fedbench sweep benchmarks/sweeps/{stem}.yaml & done; wait\n" + yaml.safe_dump(sweep, sort_keys=False))


def write_tables(stem: str, selections: list[Selection], metric: str, folder: Path = HERE) -> list[Path]:
    """Once every group has chosen inside its rates: the chosen settings, one file per alpha and method
    (``--export``'s), and the sweeps of the tables that run them at the test seeds: the main table, and
    the shift table, where each method runs the setting it chose at the shift benchmark's alpha."""
    table, base, rounds, shift = TABLES[stem]
    waiting = [s for s in selections if s.score is None or s.lr_edge]
    if waiting:
        print(f"make_tuning: {stem}: {len(waiting)} groups have not chosen yet or chose an end of the rates "
              f"tried: no table sweeps written")
        return []
    source = f"benchmarks/sweeps/{stem}_core.yaml benchmarks/sweeps/{stem}_widen_dir*.yaml"
    exported = export_selection(selections, folder / table, metric, source)
    configs = [os.path.relpath(p) for p in exported]
    out = [folder / f"{table}.yaml"]
    out[0].write_text(table_sweep(table, base, configs, rounds,
                                  f"The main table of issue #29: each method at the setting {stem} chose on validation"))
    # FedCoE's personal label prior is the one part of its `personal` no baseline has (every method gets
    # the prior as an adapter, the `personal + prior` column): retrained without it, at the same settings
    fedcoe = [c for c in configs if c.endswith("-fedcoe.yaml")]
    if fedcoe:
        out.append(folder / f"{table}_ablation.yaml")
        out[-1].write_text(table_sweep(f"{table}_ablation", base, fedcoe, rounds,
                                       f"FedCoE without its personal label prior (issue #29), at the settings {stem} chose",
                                       {"method.init_args.local_prior": False, "name": "fedcoe-no_local_prior"}))
        out += write_switches(table, base, fedcoe, rounds, folder)
    if shift:
        alpha = yaml.safe_load(Path(shift).read_text())["data"]["alpha"]
        settings = [s.setting["config"] for s in selections if s.group[2] == alpha]
        if not settings:
            raise SystemExit(f"make_tuning: {stem} tuned no setting at {shift}'s alpha {alpha}; tune it there or "
                             f"change the shift table's base config in TABLES")
        out.append(folder / f"{table}_shift.yaml")
        out[-1].write_text(table_sweep(f"{table}_shift", shift, settings, rounds,
                                      f"The shift table of issue #29: each method at the setting {stem} chose at Dirichlet {alpha}"))
    return exported + out


def write_switches(table: str, base: str, chosen: list[str], rounds: int, folder: Path) -> list[Path]:
    """FedCoE's ablations at the chosen settings: one setting file per (chosen setting, switch), the chosen
    one with that switch off and the switch's name (``{table}_ablation/``), and the sweep that runs them
    at the test seeds, seed by seed (``{table}_switches.yaml``)."""
    files = []
    (folder / f"{table}_ablation").mkdir(exist_ok=True)
    for path in chosen:
        setting = yaml.safe_load(Path(path).read_text())
        for switch in SWITCHES:
            variant = yaml.safe_load((HERE / "fedcoe_variants" / f"{switch}.yaml").read_text())
            init = {**setting["method"]["init_args"], **variant["method"]["init_args"]}
            files.append(folder / f"{table}_ablation" / f"{Path(path).stem}-{switch}.yaml")
            files[-1].write_text(f"# {path} with {switch} (fedcoe_variants/{switch}.yaml; written by make_tuning.py)\n"
                                 + yaml.safe_dump({**setting, "name": variant["name"],
                                                   "method": {**setting["method"], "init_args": init}}, sort_keys=False))
    configs = [os.path.relpath(f) for f in files]
    sweep = folder / f"{table}_switches.yaml"
    sweep.write_text(table_sweep(f"{table}_switches", base, configs, rounds,
                                 f"FedCoE's switches one at a time (issue #29's rerun of its ablations), at the settings "
                                 f"its tuning chose; seed by seed"))
    return files + [sweep]


def main() -> None:
    os.chdir(HERE.parents[1])  # the sweeps name every file from the repository root
    files, core = write_settings(HERE / "tune_v2")
    for stem, (base, alphas, rounds, fixed) in BENCHMARKS.items():
        write_sweeps(stem, base, alphas, rounds, fixed, files, core)
        if (RECORDS / stem).is_dir():
            write_tables(stem, *write_widening(stem, RECORDS / stem))


if __name__ == "__main__":
    main()
