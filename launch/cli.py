"""`plait launch {train,prep,score,dedup,resubmit,local,status,cancel}`: parse, render, submit.

Everything after the first `--` is passed through untouched to the payload
(`pipeline.train` or `data_prep.cli shard`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch import render, slurm
from launch.local import run_local
from launch.spec import CONTAINER_RUNTIMES, LAUNCHERS, Container, PrepJob, Resources, TrainJob


def _split_payload(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _add_resources(p: argparse.ArgumentParser, multi_node: bool) -> None:
    g = p.add_argument_group("allocation")
    if multi_node:
        g.add_argument("--nodes", type=int, default=1, help="number of nodes")
        g.add_argument("--procs-per-node", "--gpus-per-node", dest="procs_per_node", type=int, default=1,
                       help="training processes per node: one per GPU, or CPU processes with --cpu")
        g.add_argument("--cpu", action="store_true",
                       help="no GPUs: request none and pass train.device=cpu (CPU clusters, tests)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    g.add_argument("--partition", "-p")
    g.add_argument("--account", "-A")
    g.add_argument("--time", "-t", help="time limit in sbatch format, e.g. 2-00:00:00")
    g.add_argument("--qos")
    g.add_argument("--constraint", "-C")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, verbatim, e.g. --sbatch=--mail-type=END (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the payload, e.g. 'module load cuda' (repeatable)")
    c = p.add_argument_group("container")
    c.add_argument("--container", metavar="IMAGE", help="run inside IMAGE (.sif / docker:// for apptainer, "
                                                         "a registry image for pyxis)")
    c.add_argument("--container-runtime", choices=CONTAINER_RUNTIMES,
                   help="default: apptainer for .sif and URIs, else pyxis")
    c.add_argument("--bind", action="append", default=[], metavar="PATH",
                   help="host path to make visible in the container (repeatable)")
    p.add_argument("--run-dir", required=True, type=Path, help="where the scripts, logs and job ids go")
    p.add_argument("--job-name")
    p.add_argument("--python", help="interpreter on the compute nodes (default: this one; "
                                    "`python3` inside a container)")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script(s), submit nothing")


def _resources(args: argparse.Namespace) -> Resources:
    return Resources(
        nodes=getattr(args, "nodes", 1), procs_per_node=getattr(args, "procs_per_node", 1),
        cpu=getattr(args, "cpu", False), cpus_per_task=args.cpus_per_task, partition=args.partition,
        account=args.account, time=args.time, qos=args.qos, constraint=args.constraint,
        exclusive=args.exclusive, extra_sbatch=tuple(args.sbatch), setup=tuple(args.setup))


def _container(args: argparse.Namespace) -> Container | None:
    if not args.container:
        return None
    runtime = args.container_runtime or Container.guess_runtime(args.container)
    return Container(image=args.container, runtime=runtime, binds=tuple(args.bind))


def _python(args: argparse.Namespace, container: Container | None) -> str:
    if args.python:
        return args.python
    return "python3" if container else sys.executable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="submit a (multi-node) training job: ... -- <train args>")
    _add_resources(train, multi_node=True)
    train.add_argument("--launcher", choices=LAUNCHERS,
                       help="per-node launcher (default: accelerate on GPUs, torchrun with --cpu)")
    train.add_argument("--no-requeue", dest="requeue", action="store_false",
                       help="do not requeue on preemption")
    train.add_argument("--signal-lead", dest="signal_lead_s", type=int, default=120, metavar="SECONDS",
                       help="send USR1 this long before the time limit (default 120)")
    train.add_argument("--max-restarts", type=int, default=3, help="requeue at most this often (default 3)")

    prep = sub.add_parser("prep", help="submit data prep as a job array plus a merge job: ... -- <shard args>")
    _add_resources(prep, multi_node=False)
    prep.add_argument("--tasks", dest="num_tasks", type=int, required=True, help="number of array tasks")
    prep.add_argument("--throttle", type=int, help="at most this many tasks at once (the %% in --array)")
    prep.add_argument("--output-dir", help="dataset directory the merge job finalizes (default: the shard "
                                           "args' --output)")

    score = sub.add_parser("score", help="`plait prep score` as a job array (one task per shard range), then "
                           "optionally `plait prep filter`: ... -- DATASET --model EXPORT [score args]")
    _add_resources(score, multi_node=False)
    score.add_argument("--tasks", dest="num_tasks", type=int, required=True, help="number of array tasks")
    score.add_argument("--throttle", type=int, help="at most this many tasks at once (the %% in --array)")
    score.add_argument("--filter", dest="filter_args", metavar="ARGS", help="`plait prep filter` arguments after "
                       "DATASET, as one shell-quoted string, run once every task succeeded, e.g. "
                       "'--output NEW --top-fraction 0.3'")

    dedup = sub.add_parser("dedup", help="`plait prep filter` with the clustered near-duplicate search as job "
                           "arrays: a prepare job, the assignment array, the unit array, the filter again: ... -- "
                           "DATASET --output NEW --dedup-embeddings T [filter args]")
    _add_resources(dedup, multi_node=False)
    dedup.add_argument("--tasks", dest="num_tasks", type=int, required=True, help="tasks of each array (a task "
                       "runs a contiguous range of the assignment parts, then of the units)")
    dedup.add_argument("--throttle", type=int, help="at most this many tasks at once (the %% in --array)")

    resubmit = sub.add_parser("resubmit", help="rerun failed prep array tasks, then the merge again")
    resubmit.add_argument("run_dir", type=Path)
    resubmit.add_argument("--tasks", help="comma-separated task ids (default: the failed ones)")

    local = sub.add_parser("local", help="multi-process training on this machine: ... -- <train args>")
    local.add_argument("--nproc", type=int, required=True, help="number of processes")
    local.add_argument("--cpu", action="store_true", help="pass train.device=cpu")
    local.add_argument("--dry-run", action="store_true", help="print the command, run nothing")

    for name, text in (("status", "show the state of a run's jobs"), ("cancel", "cancel a run's jobs")):
        sub.add_parser(name, help=text).add_argument("run_dir", type=Path)
    return parser


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.rename(path)
    return path


def cmd_train(args: argparse.Namespace, payload: list[str]) -> int:
    container = _container(args)
    job = TrainJob(
        run_dir=args.run_dir.resolve(), resources=_resources(args), train_args=tuple(payload),
        job_name=args.job_name or "plait-train", launcher=args.launcher, python=_python(args, container),
        requeue=args.requeue, signal_lead_s=args.signal_lead_s, max_restarts=args.max_restarts,
        container=container)
    script = render.render_train(job)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    path = _write(job.run_dir / "job.sbatch", script)
    job_id = slurm.submit(job.run_dir, "train", path)
    print(f"submitted training job {job_id}; script {path}, log {job.run_dir}/slurm-{job_id}.out")
    return 0


def _output_of(payload: list[str]) -> str | None:
    for i, arg in enumerate(payload):
        if arg == "--output" and i + 1 < len(payload):
            return payload[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    return None


def cmd_prep(args: argparse.Namespace, payload: list[str]) -> int:
    container = _container(args)
    output_dir = args.output_dir or _output_of(payload)
    if not output_dir:
        raise ValueError("prep needs the dataset directory: pass --output DIR in the shard args (after --)")
    job = PrepJob(
        run_dir=args.run_dir.resolve(), output_dir=output_dir, prep_args=tuple(payload),
        num_tasks=args.num_tasks, throttle=args.throttle, resources=_resources(args),
        job_name=args.job_name or "plait-prep", python=_python(args, container), container=container)
    array_script, merge_script = render.render_prep_array(job), render.render_prep_merge(job)
    if args.dry_run:
        sys.stdout.write(array_script + "\n# ---- merge job (submitted with --dependency=afterok:ARRAY_ID)\n"
                         + merge_script)
        return 0
    array_path = _write(job.run_dir / "prep.sbatch", array_script)
    merge_path = _write(job.run_dir / "merge.sbatch", merge_script)
    array_id = slurm.submit(job.run_dir, "prep-array", array_path)
    merge_id = _submit_merge(job.run_dir, merge_path, array_id)
    print(f"submitted prep array {array_id} ({job.num_tasks} tasks) and merge job {merge_id}")
    return 0


def cmd_score(args: argparse.Namespace, payload: list[str]) -> int:
    import shlex
    container = _container(args)
    dataset = next((a for a in payload if not a.startswith("-")), None)
    if not dataset:
        raise ValueError("score needs the dataset: pass DATASET --model EXPORT after --")
    job = PrepJob(
        run_dir=args.run_dir.resolve(), output_dir=dataset, prep_args=tuple(payload), num_tasks=args.num_tasks,
        throttle=args.throttle, resources=_resources(args), job_name=args.job_name or "plait-score",
        python=_python(args, container), container=container)
    scripts = [("score.sbatch", render.render_score_array(job))]
    if args.filter_args is not None:
        filter_args = tuple(shlex.split(args.filter_args))
        out = next((payload[i + 1] for i, a in enumerate(payload[:-1]) if a == "--out"), None)
        if out and not any(a == "--scores" or a.startswith("--scores=") for a in filter_args):
            filter_args += ("--scores", out)  # the filter reads the folder the array writes
        scripts.append(("filter.sbatch", render.render_filter(job, filter_args)))
    if args.dry_run:
        sys.stdout.write("\n# ---- filter job (submitted with --dependency=afterok:ARRAY_ID)\n".join(
            text for _, text in scripts))
        return 0
    paths = [_write(job.run_dir / name, text) for name, text in scripts]
    array_id = slurm.submit(job.run_dir, "score-array", paths[0])
    message = f"submitted score array {array_id} ({job.num_tasks} tasks)"
    if len(paths) > 1:
        filter_id = slurm.submit(job.run_dir, "score-filter", paths[1], f"--dependency=afterok:{array_id}",
                                 "--kill-on-invalid-dep=yes")
        message += f" and filter job {filter_id}"
    print(message)
    return 0


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def cmd_dedup(args: argparse.Namespace, payload: list[str]) -> int:
    """Four jobs over one filter command: it copies the candidates' embeddings, trains k-means and stops
    (--dedup-units array), an array assigns the rows, an array runs the units, the same command again resolves
    the verdicts and writes the dataset."""
    container = _container(args)
    dataset = next((a for a in payload if not a.startswith("-")), None)
    output = _flag_value(payload, "--output")
    if not dataset or not output:
        raise ValueError("dedup needs the filter's DATASET and --output NEW after --")
    if _flag_value(payload, "--dedup-embeddings") is None:
        raise ValueError("dedup needs --dedup-embeddings THRESH in the filter args")
    if _flag_value(payload, "--dedup-units") not in (None, "array"):
        raise ValueError("dedup: the filter args set --dedup-units local; the array runs the units")
    if _flag_value(payload, "--dedup-method") not in (None, "clustered"):
        raise ValueError("dedup: the units are the clustered search's; drop --dedup-method or set clustered")
    if "://" in output and _flag_value(payload, "--dedup-work") is None:
        raise ValueError(f"dedup: --output {output!r} is not a local folder: name a shared one with --dedup-work")
    work = _flag_value(payload, "--dedup-work") or f"{output.rstrip('/')}/_dedup"
    filter_args = [a for a in payload if a != dataset]
    filter_args += [f for f, v in (("--dedup-method", "clustered"), ("--dedup-units", "array"))
                    if _flag_value(payload, f) is None for f in (f, v)]
    if _flag_value(payload, "--dedup-work") is None:
        filter_args += ["--dedup-work", work]
    job = PrepJob(
        run_dir=args.run_dir.resolve(), output_dir=dataset, prep_args=tuple(filter_args), num_tasks=args.num_tasks,
        throttle=args.throttle, resources=_resources(args), job_name=args.job_name or "plait-dedup",
        python=_python(args, container), container=container)
    scripts = [("dedup-prepare", "dedup_prepare.sbatch", render.render_filter(job, tuple(filter_args))),
               ("dedup-assign", "dedup_assign.sbatch", render.render_dedup_array(job, work, "assign")),
               ("dedup-units", "dedup_units.sbatch", render.render_dedup_array(job, work, "units")),
               ("dedup-filter", "dedup_filter.sbatch", render.render_filter(job, tuple(filter_args)))]
    if args.dry_run:
        sys.stdout.write("".join(f"# ---- {name}\n{text}" for _, name, text in scripts))
        return 0
    ids: list[str] = []
    for kind, name, text in scripts:  # each after the one before succeeded
        after = (f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes") if ids else ()
        ids.append(slurm.submit(job.run_dir, kind, _write(job.run_dir / name, text), *after))
    print(f"submitted dedup prepare job {ids[0]}, assignment array {ids[1]} and unit array {ids[2]} "
          f"({job.num_tasks} tasks each), filter job {ids[3]}")
    return 0


def _submit_merge(run_dir: Path, merge_path: Path, array_id: str) -> str:
    # kill-on-invalid-dep: if a task fails the merge is cancelled instead of pending forever;
    # `plait launch resubmit` queues a new one after the rerun tasks.
    return slurm.submit(run_dir, "prep-merge", merge_path, f"--dependency=afterok:{array_id}",
                        "--kill-on-invalid-dep=yes")


def cmd_resubmit(args: argparse.Namespace) -> int:
    run_dir = args.run_dir.resolve()
    arrays = [r for r in slurm.read_records(run_dir) if r.kind == "prep-array"]
    if not arrays:
        raise ValueError(f"{run_dir} has no prep array job to resubmit")
    if args.tasks:
        try:
            task_ids = sorted({int(t) for t in args.tasks.split(",")})
        except ValueError:
            raise ValueError(f"--tasks {args.tasks!r}: give comma-separated integers, e.g. 3,5") from None
    else:
        task_ids = slurm.failed_array_tasks(arrays[-1].job_id)
        if not task_ids:
            raise ValueError(f"no failed task found in array job {arrays[-1].job_id}; name them with --tasks")
    array_id = slurm.submit(run_dir, "prep-array", run_dir / "prep.sbatch",
                            f"--array={render.array_spec(0, None, task_ids)}")
    merge_id = _submit_merge(run_dir, run_dir / "merge.sbatch", array_id)
    print(f"resubmitted tasks {','.join(map(str, task_ids))} as array {array_id}; merge job {merge_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ours, payload = _split_payload(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(ours)
    try:
        if args.command == "train":
            return cmd_train(args, payload)
        if args.command == "prep":
            return cmd_prep(args, payload)
        if args.command == "score":
            return cmd_score(args, payload)
        if args.command == "dedup":
            return cmd_dedup(args, payload)
        if args.command == "resubmit":
            return cmd_resubmit(args)
        if args.command == "local":
            return run_local(args.nproc, payload, cpu=args.cpu, dry_run=args.dry_run)
        if args.command == "status":
            print("\n".join(slurm.status_lines(args.run_dir)))
            return 0
        if args.command == "cancel":
            cancelled = slurm.cancel(args.run_dir)
            print(f"cancelled {', '.join(cancelled)}" if cancelled else "nothing to cancel")
            return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        parser.exit(2, f"plait: error: {exc}\n")
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
