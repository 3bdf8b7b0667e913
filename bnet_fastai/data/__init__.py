"""Datasets: the registry, downloads and the embedded sample (`datasets`), the decoded cache behind the default
pipeline (`cache`), Fashion-MNIST's IDX files (`fashion_mnist`) and which datasets can be had (`available`)."""
