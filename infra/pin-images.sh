#!/usr/bin/env bash
# Pins the images by digest, which a registry cannot move as it can a tag. The repository holds a placeholder digest
# (sha256: and 64 zeros, which no registry serves: an unpinned image fails to pull rather than run something else).
#
#   infra/pin-images.sh base sha256:HEX          the Dockerfile's base image (rayproject/ray), e.g. the linux/amd64
#                                                digest of `docker buildx imagetools inspect rayproject/ray:TAG`
#   infra/pin-images.sh app REPOSITORY@sha256:HEX  every container of infra/k8s: the image you built and pushed, e.g.
#                                                registry.example.com/ml/uniformer-pipeline:0.1.0@sha256:HEX
#                                                (`docker push` prints the digest)
# A release runs `app` after pushing the image and before `kubectl apply -k infra/k8s` or `kubectl create -f` a RayJob.
set -euo pipefail
infra="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
digest='sha256:[0-9a-f]{64}'

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[ $# -eq 2 ] || usage
case "$1" in
  base)
    [[ "$2" =~ ^${digest}$ ]] || { echo "not a digest: $2 (want sha256: and 64 hex digits)" >&2; exit 2; }
    sed -E -i "s#^(FROM rayproject/ray:[^@ ]+)@${digest}#\\1@$2#" "$infra/Dockerfile"
    grep -q "@$2\$" "$infra/Dockerfile" \
      || { echo "no 'FROM rayproject/ray:TAG@sha256:...' line in $infra/Dockerfile" >&2; exit 1; }
    ;;
  app)
    [[ "$2" =~ ^([a-z0-9][a-z0-9._:-]*/)*uniformer-pipeline(:[A-Za-z0-9._-]+)?@${digest}$ ]] \
      || { echo "not an image reference of uniformer-pipeline pinned by digest: $2" >&2; exit 2; }
    sed -E -i "s#^( +image: )[^ ]*uniformer-pipeline[^ ]*\$#\\1$2#" "$infra"/k8s/*.yaml
    ;;
  *) usage ;;
esac
