"""Test suites. A regular package so ``test.<helper>`` resolves here, not to the stdlib's ``test``."""
