"""helexa: a distributed AI inference fabric (cortex control planes, neuron data planes)."""

__version__ = "0.1.0"
