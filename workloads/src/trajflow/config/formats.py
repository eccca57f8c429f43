"""The string formats of values: regular expressions for the config models and the charts'
values schemas, and the same formats in words for the errors that refuse a value (nobody
should have to read a regular expression to learn what a key takes)."""
from __future__ import annotations

import functools
import re

# Kubernetes
# a non-negative resource.Quantity, as apimachinery's quantity.go parses it
QUANTITY = r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# the same with a digit other than 0 in the number: a PVC's storage request must be above zero
POSITIVE_QUANTITY = (r"^[+]?((0*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))"
                     r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_NAME_OR_EMPTY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"
QUALIFIED_NAME = r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"  # label keys, resource names
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# the chart's own pod labels, which Services and NetworkPolicies select on: podLabels may not set them
CHART_POD_LABEL = r"^app\.kubernetes\.io/(name|instance|component|part-of)$"
# ... and the further labels it gives its Jobs: jobLabels may not set them either
CHART_JOB_LABEL = r"^(app\.kubernetes\.io/(name|instance|component|part-of|version|managed-by)|helm\.sh/chart|trajflow\.io/release)$"
CONTAINER_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
ABSOLUTE_PATH = r"^/"
# where the chart's pods mount volumes themselves: an extra mount there is a duplicate the API
# server refuses, or one the kubelet cannot make inside a read-only ConfigMap volume
CHART_MOUNT_PATH = r"^(/etc/trajflow(-dataset)?(/.*)?|/tmp/*|/dev/shm/*)$"
IMAGE_TAG = r"^([\w][\w.-]{0,127})?$"
# a registry host[:port] with an optional path (no scheme: the kubelet refuses https://...)
IMAGE_REGISTRY_OR_EMPTY = r"^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*/?)?$"
# (a registry host[:port]/ in front is kept, for an empty registry)
IMAGE_REPOSITORY = r"^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$"
IMAGE_DIGEST = r"^(sha256:[a-f0-9]{64})?$"
# Environment variable names that carry secrets: their value must come from valueFrom...
SECRET_ENV = r"(?i)(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL)"
# ...unless they name where a secret lies (AWS_WEB_IDENTITY_TOKEN_FILE, GOOGLE_APPLICATION_CREDENTIALS)
# or only sound secret (TOKENIZERS_PARALLELISM)
SECRET_LOCATION_ENV = r"(?i)(_FILE|_PATH|_DIR)$|^GOOGLE_APPLICATION_CREDENTIALS$|^TOKENIZERS_"

# trajflow
# `90s`, `30m`, `6h`, `1h30m`, `90` (seconds), as `trajflow wait --timeout` reads them; a bare
# number only alone (`1h30` is refused, not read as 1h 30s)
DURATION = r"^([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?h)?([0-9]+(\.[0-9]+)?m)?([0-9]+(\.[0-9]+)?s)?)$"
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ENV_NAME_OR_EMPTY = r"^([A-Za-z_][A-Za-z0-9_]*)?$"
PLAN_GENERATION = r"^[A-Za-z0-9._-]*$"
RELEASE_REF_OR_EMPTY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"  # namespace/release
S3_URI = r"^s3://[^/]+(/.*)?$"
S3_BUCKET_OR_EMPTY = r"^([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])?$"
# '/'-separated names, none empty, '.' or '..' (RE2, as Helm's schema check runs it, has no lookahead)
_KEY_SEGMENT = r"([^/\\.][^/\\]*|\.[^/\\.][^/\\]*|\.\.[^/\\]+)"
S3_KEY_PREFIX = rf"^/?({_KEY_SEGMENT}(/{_KEY_SEGMENT})*)?/?$"
RELATIVE_PATH_OR_EMPTY = rf"^({_KEY_SEGMENT}(/{_KEY_SEGMENT})*)?$"
CHECKSUM_HEX = r"^([0-9a-f]{32}|[0-9a-f]{64})$"
# str.format fields of a catalog's URL template and file parts ({{ and }} are literal braces)
URL_TEMPLATE_FIELDS = r"^([^{}]|\{\{|\}\}|\{(cohort|category|file)\})*$"
FILE_PART = r"^([^{}]|\{\{|\}\}|\{(cohort|category)\})+$"
HAS_COHORT_FIELD = r"\{cohort\}"
HAS_FILE_FIELD = r"\{(file|category)\}"
# a host (a bracketed IPv6 address, or a name as lenient as urllib3: a trailing dot, '_',
# a catalog's {cohort}) and a port of 1-65535; no user:password@ (urllib3 would not send it)
_HOST_PORT = (r"(\[[0-9A-Fa-f:.]+\]|[^\[\]/?#@\s:]+)"
              r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?")
HTTP_URL = rf"^https?://{_HOST_PORT}([/?#].*)?$"
HTTP_URL_OR_EMPTY = rf"^(https?://{_HOST_PORT}([/?#].*)?)?$"
PUSHGATEWAY_URL = rf"^(https?://{_HOST_PORT}([/?#].*)?|(https?://)?\{{\{{.*)?$"
# what botocore accepts as a region name (others fail at the first request, with a traceback)
S3_REGION = r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)?$"  # empty: us-east-1
SHA256_HEX_OR_EMPTY = r"^([0-9a-f]{64})?$"
MD5_HEX_OR_EMPTY = r"^([0-9a-f]{32})?$"

# Prometheus and Grafana (the monitoring chart)
PROMETHEUS_DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
PROMETHEUS_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
GRAFANA_UID = r"^[a-zA-Z0-9_-]{0,40}$"
FLAG = r"^--"

IN_WORDS = {
    QUANTITY: "a Kubernetes quantity (such as 500m, 2, 512Mi, 1.5Gi)",
    POSITIVE_QUANTITY: "a Kubernetes quantity above zero (such as 100Gi, 1.5Ti)",
    DNS_LABEL: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
    DNS_SUBDOMAIN: "a DNS name: DNS labels (lowercase letters, digits and '-') joined by '.'",
    OBJECT_NAME_OR_EMPTY: "empty or a Kubernetes object name: lowercase letters, digits, '-' and '.', "
                          "starting and ending with a letter or digit",
    QUALIFIED_NAME: "a Kubernetes name (such as app, cpu, example.com/gpu): letters, digits, '-', '_' and '.' "
                    "after an optional DNS prefix and '/'",
    LABEL_VALUE: "a label value: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
    CHART_POD_LABEL: "a label the chart sets itself (Services and NetworkPolicies select on it)",
    CHART_JOB_LABEL: "a label the chart sets on its Jobs itself",
    CONTAINER_ENV_NAME: "an environment variable name: letters, digits, '-', '_' and '.', not starting with a digit",
    ABSOLUTE_PATH: "an absolute path (starting with '/')",
    CHART_MOUNT_PATH: "a path the chart's pods mount themselves (/tmp, /dev/shm, or /etc/trajflow or "
                      "/etc/trajflow-dataset and below): choose another",
    IMAGE_TAG: "empty or an image tag: up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'",
    IMAGE_DIGEST: "empty or an image digest: sha256: and 64 lowercase hex digits",
    IMAGE_REGISTRY_OR_EMPTY: "empty or a registry host, with an optional :port and path (such as ghcr.io, "
                             "registry.local:5000/mirror; no https://)",
    IMAGE_REPOSITORY: "an image repository: lowercase names joined by '/' (such as trajflow/trajflow-gpu), "
                      "after an optional registry host[:port]/",
    DURATION: "a duration (such as 90s, 30m, 6h, 1h30m; a bare number is seconds)",
    SOURCE_NAME: "a name of letters, digits, '.', '_' and '-', starting with a letter or digit",
    ENV_NAME_OR_EMPTY: "empty or an environment variable name: letters, digits and '_', not starting with a digit",
    PLAN_GENERATION: "letters, digits, '.', '_' and '-' only",
    RELEASE_REF_OR_EMPTY: "empty or <namespace>/<release> (such as ml/exp-a)",
    S3_URI: "an s3://bucket or s3://bucket/prefix URI",
    S3_BUCKET_OR_EMPTY: "empty or a bucket name: 3-63 lowercase letters, digits, '.' and '-', starting and ending with "
                        "a letter or digit",
    S3_KEY_PREFIX: "a key prefix: names joined by '/', none of them empty, '.' or '..', and no backslash",
    RELATIVE_PATH_OR_EMPTY: "empty or a relative path: names joined by '/', none of them empty, '.' or '..', "
                            "and no backslash",
    CHECKSUM_HEX: "64 (SHA-256) or 32 (MD5) lowercase hex digits",
    URL_TEMPLATE_FIELDS: "a template whose only placeholders are {cohort}, {category} and {file}",
    FILE_PART: "a file name part whose only placeholders are {cohort} and {category}",
    HAS_COHORT_FIELD: "a template with a {cohort} placeholder",
    HAS_FILE_FIELD: "a template with a {file} or {category} placeholder",
    HTTP_URL: "an http:// or https:// URL with a host, a port of 1-65535 if any, and no user:password@ (a token goes in "
              "authTokenEnv)",
    HTTP_URL_OR_EMPTY: "empty or an http:// or https:// URL with a host, a port of 1-65535 if any, and no user:password@ "
                       "(nothing would send it)",
    PUSHGATEWAY_URL: "empty, an http:// or https:// URL with a host, a port of 1-65535 if any, and no user:password@, or a "
                     "Helm template whose host starts with {{",
    S3_REGION: "empty or a region name: letters, digits and '-' (such as us-east-1)",
    SHA256_HEX_OR_EMPTY: "empty or a SHA-256 of 64 lowercase hex digits",
    MD5_HEX_OR_EMPTY: "empty or an MD5 of 32 lowercase hex digits",
    PROMETHEUS_DURATION: "a Prometheus duration (such as 30s, 5m, 1h, 1h30m)",
    PROMETHEUS_LABEL_NAME: "a Prometheus label name: letters, digits and '_', not starting with a digit",
    GRAFANA_UID: "up to 40 letters, digits, '_' and '-'",
    FLAG: "a command-line flag starting with --",
}


def without_secrets(value: str) -> str:
    """`value` fit to repeat in an error: a URL's user:password@ and query may be credentials."""
    shown = re.sub(r"//[^/?#]*@", "//…@", value)
    return re.sub(r"\?.*", "?…", shown) if "://" in shown else shown


@functools.lru_cache(maxsize=None)
def go_regex(pattern: str) -> re.Pattern[str]:
    """`pattern` compiled to match as Go's regexp does in Helm's schema checks: its `$` is the
    end of the text, where Python's also matches before a final newline ("high\\n")."""
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def in_words(pattern: str) -> str:
    """What `pattern` accepts, in words (the pattern itself for one without words)."""
    return IN_WORDS.get(pattern, f"a string matching {pattern}")
