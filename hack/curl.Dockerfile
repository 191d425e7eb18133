# The image behind the seed's `kubectl run -i --rm --restart=Never curl --image=<this> -- curl ...`:
# the Debian Python base (hack/ builds it from Debian packages; no Docker Hub) plus curl. No ENTRYPOINT,
# so the words after `--` are the command, as with the seed's curlimages/curl.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends curl >/dev/null \
 && rm -rf /var/lib/apt/lists/*
USER 65532
CMD ["curl", "--version"]
