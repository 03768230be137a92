"""The preamble of code the tests run in a fresh interpreter where `cdcl_hf` cannot be imported: what a user without
the package has (checkpoints, pipelines, the Space must work there from their own files)."""

WITHOUT_CDCL_HF = """import sys


class RefuseCdclHf:
    def find_spec(self, name, path=None, target=None):
        if name == "cdcl_hf" or name.startswith("cdcl_hf."):
            raise ModuleNotFoundError("cdcl_hf is not installed here")
        return None


sys.meta_path.insert(0, RefuseCdclHf())
"""
