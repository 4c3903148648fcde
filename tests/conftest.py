"""Test-suite root. Its presence puts ``tests/`` on ``sys.path``, so shared
support modules such as ``hubproc`` import by name from every test folder."""
