"""Layer 3, the Triton adapter: the only code that imports ``triton_python_backend_utils``.
It converts Triton tensors to and from :mod:`gradtrust.serving` and nothing more."""
