module github.com/comput3ai/c3-node-proxy

go 1.26
