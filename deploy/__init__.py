"""Running Assay beyond one machine: the Ray Serve application, and the files containers and clusters read.

The Python here is the Ray Serve application (both services as Ray Serve deployments over the same
serving layer and HTTP API) and the `assay deploy` command. Beside it, as plain files: the
Dockerfiles and `compose.yaml`, the Prometheus and Grafana provisioning, and the Kubernetes and
KubeRay manifests. The README's "Beyond one machine" says how they fit together.
"""
