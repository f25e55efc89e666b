"""GCS memory per Ray actor call: a controlled measurement (README "GCS memory of long runs").

Starts a local Ray, creates one trivial actor and issues ``--calls`` actor calls
(``ray.get`` in batches of ``--batch``), optionally with a ``--payload_kb`` bytes
argument and result, or ``ray.put`` + call per item. Samples the RSS of the
embedded ``gcs_server`` before and after, and prints one JSON line: calls, GCS
RSS (MB) before/after/peak, KB per call, and the number of tasks the GCS keeps
(``ray.util.state.summarize_tasks``), which shows whether a task-event setting
reached it.

Vary one thing at a time::

    python benchmarks/gcs_growth.py --calls 30000                     # Ray's defaults
    python benchmarks/gcs_growth.py --calls 30000 --no_task_events    # actor option enable_task_events=False
    python benchmarks/gcs_growth.py --calls 30000 --max_tasks_in_gcs 1000  # _system_config cap
    RAY_enable_task_events=0 python benchmarks/gcs_growth.py ...      # environment, as the soak tried
"""

from __future__ import annotations

import argparse
import json
import time

import psutil
import ray

from gfn_dist.distributed import ray_compat


class Echo:
    """A trivial actor: returns its argument (or its length)."""

    def call(self, x=None, reply_kb: int = 0):
        return b"r" * (reply_kb * 1024) if reply_kb else 0


def _rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def _tasks_in_gcs() -> int | str:
    try:
        from ray.util.state import summarize_tasks

        summary = summarize_tasks(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False)
        return sum(v["state_counts"].get("FINISHED", 0) for v in summary["cluster"]["summary"].values())
    except Exception as err:  # the state API needs the dashboard (--dashboard)
        return repr(err)[:200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--batch", type=int, default=100, help="calls in flight per ray.get")
    p.add_argument("--payload_kb", type=int, default=0, help="bytes argument and result of each call, KB")
    p.add_argument("--put", action="store_true", help="ray.put the argument first, pass the ref")
    p.add_argument("--no_task_events", action="store_true", help="actor option enable_task_events=False")
    p.add_argument("--max_tasks_in_gcs", type=int, default=None, help="_system_config task_events_max_num_task_in_gcs")
    p.add_argument("--dashboard", action="store_true", help="include_dashboard (state API task counts)")
    p.add_argument("--samples", type=int, default=5, help="RSS samples during the run (shows a plateau)")
    args = p.parse_args()

    system_config = {}
    if args.max_tasks_in_gcs is not None:
        system_config["task_events_max_num_task_in_gcs"] = args.max_tasks_in_gcs
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=args.dashboard,
        log_to_driver=False,
        _system_config=system_config or None,
    )
    try:
        gcs = psutil.Process(ray_compat.embedded_session()[1]["gcs_server"])
        options = {"num_cpus": 0}
        if args.no_task_events:
            options["enable_task_events"] = False
        actor = ray.remote(Echo).options(**options).remote()
        payload = b"x" * (args.payload_kb * 1024) if args.payload_kb else None
        ray.get([actor.call.remote() for _ in range(args.batch)])  # warm up: worker, connections
        time.sleep(2.0)
        before = _rss_mb(gcs)
        trace = [(0, round(before, 1))]
        sample_every = max(1, args.calls // args.samples)
        t0 = time.monotonic()
        done = 0
        while done < args.calls:
            n = min(args.batch, args.calls - done)
            arg = ray.put(payload) if args.put else payload
            ray.get([actor.call.remote(arg, args.payload_kb) for _ in range(n)])
            done += n
            if done // sample_every != (done - n) // sample_every:
                trace.append((done, round(_rss_mb(gcs), 1)))
        elapsed = time.monotonic() - t0
        time.sleep(3.0)  # task events are flushed to the GCS every second (task_events_report_interval_ms)
        after = _rss_mb(gcs)
        trace.append((done, round(after, 1)))
        print(
            json.dumps(
                {
                    "calls": done,
                    "payload_kb": args.payload_kb,
                    "put": args.put,
                    "task_events": not args.no_task_events,
                    "max_tasks_in_gcs": args.max_tasks_in_gcs,
                    "gcs_rss_mb_before": round(before, 1),
                    "gcs_rss_mb_after": round(after, 1),
                    "kb_per_call": round((after - before) * 1024 / done, 3),
                    "calls_per_s": round(done / elapsed),
                    "finished_tasks_in_gcs": _tasks_in_gcs() if args.dashboard else None,
                    "trace": trace,
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
