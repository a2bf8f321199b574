"""Triton Python-backend entry of a prologue-export model repository: `prologue triton` copies this
file to `<repository>/<model>/1/model.py`. It only finds the package (the config's `site_packages`
parameter, for an environment other than the stub's own Python) and hands over to
`prologue_export.serve.triton.TritonModel`; the standard library only until then."""

import json
import os
import site
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters") or {}
        folders = params.get("site_packages", {}).get("string_value", "")
        before = list(sys.path)
        for folder in [f for f in folders.split(os.pathsep) if f]:
            site.addsitedir(folder)  # its .pth files too (an editable install)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before  # in the order given, ahead of the stub's own site-packages
        import triton_python_backend_utils as pb_utils

        from prologue_export.serve.triton import TritonModel

        self.model = TritonModel(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        model = getattr(self, "model", None)
        if model is not None:
            model.finalize()
