"""Tests of the pool doctor (figures readers, verdict, report, CLI)."""
