"""CNN inference speed and memory (issue 7).

Per-core throughput (spectra per CPU-second): torch runs on one thread, the default architecture, batches of 1024 and
random weights (speed does not depend on the weight values). CNN-TLMA runs a 10-member
ensemble, so its per-spectrum cost is 10 networks.
"""

import shutil
import tempfile

import numpy as np
import torch
import xarray as xr

from benchmarks._common import size
from mspec.ml import io as mlio
from mspec.ml.calibrate import fit_calibration, noise_proxy
from mspec.ml.infer import clear_cache, predict, predict_array
from mspec.ml.models import CLASSES, TLMA_LABELS, build_model

KINDS = ["spt", "wdm", "dmgm", "tlma"]


def _write_random_model(path, kind, members):
    torch.manual_seed(0)
    models = [build_model(kind) for _ in range(members)]
    meta = {"kind": kind, "arch": models[0].arch}
    if kind in CLASSES:
        meta["classes"] = list(CLASSES[kind])
    else:
        meta.update(labels=list(TLMA_LABELS), label_mean=[3600, 4.8, -0.2, 0.05],
                    label_std=[200, 0.2, 0.3, 0.05])  # fmt: skip
        # a calibration table (issue 18), so the calibrated-error path is what is timed
        rng = np.random.default_rng(1)
        nu = np.exp(rng.uniform(-5, 0, 600))
        err = rng.uniform(0.5, 1.5, (600, 4)) * [20, 0.02, 0.03, 0.01]
        meta["calibration"] = fit_calibration(err * rng.normal(0, 3, (600, 4)), err, nu,
                                              TLMA_LABELS)  # fmt: skip
    mlio.write_model(path, meta, [m.state_dict() for m in models])


class CNNInference:
    params = [KINDS]
    param_names = ["kind"]
    timeout = 600

    def setup(self, kind):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.n = size(4096, 32)
        self.tmp = tempfile.mkdtemp(prefix="mspec-bench-ml-")
        self.model = f"{self.tmp}/{kind}"
        _write_random_model(self.model, kind, size(10, 2) if kind == "tlma" else 1)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(self.n, 5000)).astype(np.float32)
        self.x = x
        self.ds = xr.Dataset({"flux_grid": (("spectra", "grid"), x)}).chunk(
            {"spectra": size(1024, 16)}
        )
        predict_array(self.x[:8], self.model)  # build + cache the networks once

    def teardown(self, kind):
        torch.set_num_threads(self.threads)
        clear_cache()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def time_predict_array(self, kind):
        predict_array(self.x, self.model)

    def track_spectra_per_second_per_core(self, kind):
        import time

        # CPU seconds of this process (torch on 1 thread): per-core speed, robust to a busy box
        t0 = time.process_time()
        predict_array(self.x, self.model)
        return self.n / (time.process_time() - t0)

    track_spectra_per_second_per_core.unit = "spectra/s/core"

    def peakmem_predict_dask(self, kind):
        import dask

        with dask.config.set(scheduler="synchronous"):
            predict(self.ds, self.model, lumclass=None, merge=False).compute()


class NoiseProxy:
    """The per-spectrum noise measure behind the calibrated CNN-TLMA errors (issue 18)."""

    def setup(self):
        self.x = np.random.default_rng(0).normal(size=(size(4096, 32), 5000)).astype(np.float32)

    def time_noise_proxy(self):
        noise_proxy(self.x)
