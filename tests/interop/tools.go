//go:build tools

// Package tools pins the derper command in this module so that
// "go build tailscale.com/cmd/derper" builds it at the version in go.mod.
package tools

import _ "tailscale.com/cmd/derper"
