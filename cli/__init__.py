"""The mla-retrofit command line (installed as ``mla_retrofit_cli``)."""
