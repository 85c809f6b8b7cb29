"""The processes of a multi-process training run on photos (used by tests/test_photo_stream.py).

Usage: python photo_stream_worker.py NUM_PROCESSES PORT DEVICES RUNS_JSON
Forks NUM_PROCESSES processes once the libraries are imported (tests/process_group.py), each joined to the others
over gloo (`distributed.initialize`) with DEVICES local CPU devices; exits 1 (the others killed) as soon as one
fails. RUNS_JSON: a list of {"config": {key: value}, "workdir": DIR, "log": FILE}, trained one after the other by
every process: each through `train.train_and_evaluate`, the real trainer and data pipeline. Every record a process
reads from the training split is logged (`records.Records.read` wrapped) to `log`.PROCESS_ID.json: the record
identities the test compares.
"""

import json
import os
import sys


def worker(pid: int, nproc: int, port: int, devices: int, runs_json: str) -> None:
    """Process `pid` of `nproc`: its runs, in order."""
    runs = json.load(open(runs_json))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax import default_config, distributed, train
    from alexnet_jax.data import records

    reads: list[list[int]] = []
    original = records.Records.read

    def logged(self, indices):
        if self.split == self.split_logged:
            reads.append([int(i) for i in indices.reshape(-1)])
        return original(self, indices)

    records.Records.read = logged
    initialised = False
    for run in runs:
        config = default_config.get_config()
        for k, v in run["config"].items():
            config[k] = tuple(v) if isinstance(v, list) else v
        config.distributed = "auto" if nproc > 1 else "off"
        config.coordinator_address = f"127.0.0.1:{port}" if nproc > 1 else ""
        config.num_processes, config.process_id = nproc, pid
        if not initialised:
            # before any other JAX call
            assert distributed.initialize(distributed.DistributedSpec.from_config(config)) == (nproc > 1)
            initialised = True
        records.Records.split_logged = run["train_split"]
        reads.clear()
        train.train_and_evaluate(config, run["workdir"])
        with open(f"{run['log']}.{pid}.json", "w") as f:
            json.dump(reads, f)
    if nproc > 1:
        import jax

        jax.distributed.shutdown()


def main() -> None:
    import process_group

    nproc, port, devices = (int(a) for a in sys.argv[1:4])
    import alexnet_jax.data.photos  # noqa: F401 - TensorFlow (imported by the data pipeline when first used)
    import alexnet_jax.train  # noqa: F401 - imported once, before the fork, for every process

    sys.exit(process_group.run_forked(lambda pid: worker(pid, nproc, port, devices, sys.argv[4]), nproc))


if __name__ == "__main__":
    main()
