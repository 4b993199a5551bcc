"""The load tester (``python -m loadtest <command>``, ``loadtest.cli``), in layers that import
downward only: ``core`` <- ``server`` <- ``output`` <- ``local`` <- ``studies`` / ``kvheads``."""
