# Build every image: `docker buildx bake -f images/docker-bake.hcl`.
# VERSION defaults to the chart's appVersion (the images workflow passes it in from
# Chart.yaml); the e2e workflow builds VERSION=ci, the tag values/kind.yaml asks for.
# The default REGISTRY with the target names gives the chart's default repositories.
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
