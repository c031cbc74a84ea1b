package main

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"html/template"
	"maps"
	"net/http"
	"slices"
	"strings"
)

// openAPIDoc is the OpenAPI 3.1 description of every route, served at
// /openapi.json and rendered at /docs; a test keeps it and the routes in
// step, and CI lints it with redocly.
//
//go:embed openapi.json
var openAPIDoc []byte

func handleOpenAPI() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeRaw(w, http.StatusOK, openAPIDoc)
	})
}

// apiDoc is the part of the OpenAPI document the reference shows.
type apiDoc struct {
	Info struct {
		Title, Version, Description string
	}
	Paths map[string]map[string]apiOperation
}

type apiOperation struct {
	Summary, Description string
	Parameters           []struct {
		Name, In, Description string
		Required              bool
	}
	RequestBody *struct {
		Content map[string]any
	}
	Responses map[string]struct {
		Description string
	}
}

// docsPage lays the document out: each path, each of its methods, their
// parameters, bodies and answers.
var docsPage = template.Must(template.New("docs").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Info.Title}}: API reference</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="assets/style.css">
</head>
<body class="docs">
<header><h1>{{.Info.Title}} API {{.Info.Version}}</h1></header>
<main>
<p>{{.Info.Description}}</p>
<p>The machine-readable document: <a href="openapi.json">openapi.json</a> (OpenAPI 3.1).</p>
<nav><ul>{{range .Ops}}<li><a href="#{{.ID}}"><code>{{.Method}} {{.Path}}</code></a> {{.Op.Summary}}</li>{{end}}</ul></nav>
{{range .Ops}}<section id="{{.ID}}">
<h2><code>{{.Method}} {{.Path}}</code></h2>
<p>{{.Op.Summary}}.{{if .Op.Description}} {{.Op.Description}}{{end}}</p>
{{if .Op.Parameters}}<table><thead><tr><th>parameter</th><th>in</th><th></th><th>meaning</th></tr></thead><tbody>
{{range .Op.Parameters}}<tr><td><code>{{.Name}}</code></td><td>{{.In}}</td><td>{{if .Required}}required{{end}}</td><td>{{.Description}}</td></tr>
{{end}}</tbody></table>{{end}}
{{if .Op.RequestBody}}<p>Body: {{range $k, $v := .Op.RequestBody.Content}}<code>{{$k}}</code> {{end}}</p>{{end}}
<table><thead><tr><th>status</th><th>answer</th></tr></thead><tbody>
{{range .Codes}}<tr><td>{{.Code}}</td><td>{{.Description}}</td></tr>
{{end}}</tbody></table>
</section>
{{end}}</main>
</body>
</html>
`))

// renderDocs is the HTML reference of an OpenAPI document.
func renderDocs(doc []byte) ([]byte, error) {
	var d apiDoc
	if err := json.Unmarshal(doc, &d); err != nil {
		return nil, err
	}
	type code struct{ Code, Description string }
	type op struct {
		ID, Method, Path string
		Op               apiOperation
		Codes            []code
	}
	view := struct {
		apiDoc
		Ops []op
	}{apiDoc: d}
	for _, path := range slices.Sorted(maps.Keys(d.Paths)) {
		for _, method := range slices.Sorted(maps.Keys(d.Paths[path])) {
			o := d.Paths[path][method]
			v := op{ID: method + strings.NewReplacer("/", "-", "{", "", "}", "", ".", "-").Replace(path), Method: strings.ToUpper(method), Path: path, Op: o}
			for _, c := range slices.Sorted(maps.Keys(o.Responses)) {
				v.Codes = append(v.Codes, code{c, o.Responses[c].Description})
			}
			view.Ops = append(view.Ops, v)
		}
	}
	var out bytes.Buffer
	if err := docsPage.Execute(&out, view); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// handleDocs serves the reference, rendered once from the embedded
// document, under the dashboard's policy: nothing from elsewhere.
func handleDocs() http.Handler {
	page, err := renderDocs(openAPIDoc)
	if err != nil {
		panic("docs: the embedded openapi.json does not render: " + err.Error()) // TestOpenAPIDocs renders it
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Security-Policy", dashboardPolicy)
		w.Write(page)
	})
}
