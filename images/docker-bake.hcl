# Build every image: `docker buildx bake -f images/docker-bake.hcl`.
# VERSION defaults to the chart's appVersion (the CI passes it in from Chart.yaml).
variable "REGISTRY" {
  default = "ghcr.io/trajflow"
}

variable "VERSION" {
  default = "0.1.0"
}

variable "REVISION" {
  default = "unknown"
}

group "default" {
  targets = ["downloader", "gpu"]
}

target "_common" {
  context = "."
  args = {
    VERSION  = "${VERSION}"
    REVISION = "${REVISION}"
  }
}

target "downloader" {
  inherits   = ["_common"]
  dockerfile = "images/downloader.Dockerfile"
  tags       = ["${REGISTRY}/trajflow-downloader:${VERSION}"]
}

target "gpu" {
  inherits   = ["_common"]
  dockerfile = "images/gpu.Dockerfile"
  tags       = ["${REGISTRY}/trajflow-gpu:${VERSION}"]
}
