"""Tests of deploy/: Envoy, containers, compose, Kubernetes, observability."""
