"""Tests of `infermesh up`."""
