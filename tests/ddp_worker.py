"""Run a training stage's real entry point with BatchNorm frozen, for the DDP-vs-one-process tests.

    python tests/ddp_worker.py pnoc.cam.train_classifier --flags ...                  # one process
    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py pnoc.cam.train_cam ...   # two ranks

SyncBatchNorm needs CUDA; on the CPU (gloo) each rank would normalise with its own half of the batch.
Freezing BN (the reference's ``mode=fix``) makes the statistics equal, so the two runs must agree to
float tolerance. Everything else (sampler, item seeds, DDP, the stage's loop, rank-0 writing) is the
stage's own code.
"""

from __future__ import annotations

import importlib
import sys

import pnoc.models.classifier as classifier


def _frozen(factory):
    def make(*args, **kwargs):
        return factory(*args, **kwargs).fix_bn()

    return make


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    for name in ("create_classifier", "classifier_from_artifact"):
        if hasattr(module, name):  # the stage's own reference to the factory
            setattr(module, name, _frozen(getattr(classifier, name)))
    from pnoc import cli

    cli.main(module.run, module.Config, sys.argv[2:])


if __name__ == "__main__":
    main()
