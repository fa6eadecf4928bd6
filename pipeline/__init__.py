"""The daily DERM pipeline driver (paper Figure 1, Appendix B.2–C): plans each day's upstream,
lifecycle and downstream steps and submits each as a TorchX job (``torchx_components``). The top
floor of the layering: it imports the components and reads the lower floors' outputs, nothing
imports it. ``python -m pipeline --help``; docs/pipeline.md."""
