"""Layer 2, serving without Triton: the wire contract, model settings, input checks,
image decoding, classifiers behind one protocol, the batch service and its metrics.
Imports :mod:`gradtrust.core` and :mod:`gradtrust.errors`; never Triton, never torch."""
