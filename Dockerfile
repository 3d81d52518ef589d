# The example node (examples/node.rs: the chat app, /metrics, /readyz, /livez, /mesh) as a
# container, for examples/k8s/mesh.yaml. Your own application is built the same way.
#   docker build -t socketioxide-mesh-node .
#   docker run -p 3000:3000 -e HTTP_ADDR=0.0.0.0:3000 -e MESH_TLS_DIR=/certs \
#     -v "$PWD/certs/node-0:/certs:ro" socketioxide-mesh-node
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --example node \
 && strip target/release/examples/node

# A small runtime: glibc and CA certificates, no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/examples/node /usr/local/bin/socketioxide-mesh-node
ENV HTTP_ADDR=0.0.0.0:3000 MESH_LISTEN_ADDR=0.0.0.0:7800
EXPOSE 3000 7800/udp 7800/tcp
USER nonroot
ENTRYPOINT ["/usr/local/bin/socketioxide-mesh-node"]
