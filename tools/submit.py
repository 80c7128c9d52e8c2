"""Submit a training (or evaluation) run to Slurm with submitit: one task per GPU, on one or more nodes.

    python tools/submit.py --nodes 2 --ngpus 8 --partition <p> --timeout 4320 -- \\
        --cfg configs/msg_base_p4_win7_224.yaml --data-path <imagenet> --batch-size 64 --output <shared folder>

Everything after ``--`` is ``main.py``'s command line (checked before anything is submitted). Each task learns its
rank from submitit's job environment; the first node is the rendezvous. When Slurm signals the job before its time
limit or a preemption (submitit asks for USR2), every task stops at the same update and rank 0 writes ``last.pth``
(as for SIGTERM, main.py's ``StopRequest``), then the job is requeued: the requeued job runs the same command, which
resumes from the output folder (``TRAIN.AUTO_RESUME``). A plain SIGTERM (``scancel``) checkpoints and ends the job
without a requeue; submitting the same command again resumes it. Submitit's logs go to ``--job-dir`` (default
``<output>/submitit``). ``--local`` runs the tasks on this machine (``submitit.LocalExecutor``) instead.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Trainer:
    """The submitted callable: sets the process group's variables from the job environment and runs ``main.py``;
    ``checkpoint`` (called by submitit on a timeout or preemption) requeues the same command."""

    def __init__(self, argv: list[str], master_port: Optional[int] = None) -> None:
        self.argv = list(argv)
        self.master_port = master_port

    def __call__(self) -> int:
        import submitit
        env = submitit.JobEnvironment()
        port = self.master_port or 20000 + int(''.join(c for c in str(env.job_id) if c.isdigit()) or 0) % 20000
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR='127.0.0.1' if env.num_nodes == 1 else env.hostnames[0],
                          MASTER_PORT=str(port))
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() and requeue on rank 0
        signalled = []

        def stop_then_requeue(signum, frame) -> None:  # noqa: ARG001 - signal API
            signalled.append(signum)
            os.kill(os.getpid(), signal.SIGUSR1)  # main.py's StopRequest: stop at the next update, checkpoint

        signal.signal(signal.SIGUSR2, stop_then_requeue)
        import main
        code = main.main(self.argv)
        if signalled and callable(requeue):
            requeue(signalled[0], None)  # rank 0 requeues and exits; the other ranks return
        return code

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.argv, self.master_port))


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    main_argv = argv[argv.index('--') + 1:] if '--' in argv else []
    own = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nodes', type=int, default=1)
    parser.add_argument('--ngpus', type=int, default=8, help='GPUs (tasks) per node')
    parser.add_argument('--timeout', type=int, default=4320, help='minutes')
    parser.add_argument('--partition', default='', help='Slurm partition')
    parser.add_argument('--constraint', default='', help='Slurm constraint, e.g. volta32gb')
    parser.add_argument('--comment', default='')
    parser.add_argument('--cpus-per-task', type=int, default=10)
    parser.add_argument('--job-dir', default='', help='submitit logs (default: <output>/submitit)')
    parser.add_argument('--master-port', type=int, help='rendezvous port (default: from the job id)')
    parser.add_argument('--local', action='store_true', help='run the tasks on this machine (no Slurm)')
    args = parser.parse_args(own)
    if not main_argv:
        parser.error("give main.py's arguments after '--'")
    return args, main_argv


def submit(args: argparse.Namespace, main_argv: list[str]):
    """Check the command line and submit; returns the submitit job."""
    import submitit

    import main
    from config import get_config
    config = get_config(main.parse_option(main_argv))  # a bad command line fails here, not in the queue
    job_dir = args.job_dir or os.path.join(config.OUTPUT, 'submitit')
    if args.local:
        executor = submitit.LocalExecutor(folder=job_dir)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=args.ngpus, nodes=1)
    else:
        executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=30)
        extra = {k: v for k, v in (('slurm_partition', args.partition), ('slurm_constraint', args.constraint),
                                   ('slurm_comment', args.comment)) if v}
        executor.update_parameters(mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
                                   cpus_per_task=args.cpus_per_task, nodes=args.nodes, timeout_min=args.timeout,
                                   slurm_signal_delay_s=120, **extra)
    executor.update_parameters(name=config.MODEL.NAME)
    return executor.submit(Trainer(main_argv, args.master_port))


def cli(argv: Optional[list[str]] = None) -> int:
    from config import ConfigError
    args, main_argv = parse_args(argv)
    try:
        job = submit(args, main_argv)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'submitted job {job.job_id}; logs in {job.paths.folder}')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
