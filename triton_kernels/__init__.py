"""Triton kernels of dlo (installed as ``dlo_kernels``), each with its pure-torch twin."""
