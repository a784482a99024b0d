/* The counts boundedjson.check_shape bounds an untrusted JSON document by, in one pass over its
 * bytes: strings (each a quote, then any bytes but a quote or backslash, or a backslash and any
 * byte, then a quote: the pure path's _STRING), and outside them the commas, the opening and
 * closing brackets and the deepest running sum of the brackets. A string that does not end (no
 * closing quote before the end) is what the pure path calls unterminated, whatever else follows.
 * No Python object is touched while the bytes are scanned: the GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(counts_doc,
"counts(data) -> (strings, commas, opening, closing, depth) | None\n\n"
"The strings of ``data``, and outside them its commas, opening brackets, closing brackets and the\n"
"highest running sum of the brackets (0 with none); None when a string is unterminated.");

static PyObject *counts(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len, i = 0;
    long long strings = 0, commas = 0, opening = 0, closing = 0, depth = 0, deepest = 0;
    int seen = 0, unterminated = 0;
    Py_BEGIN_ALLOW_THREADS
    while (i < n) {
        unsigned char c = p[i++];
        if (c == '"') {
            for (;;) {
                if (i >= n) {
                    unterminated = 1;
                    break;
                }
                c = p[i++];
                if (c == '"')
                    break;
                if (c == '\\') {
                    if (i >= n) {
                        unterminated = 1;
                        break;
                    }
                    i++;
                }
            }
            if (unterminated)
                break;
            strings++;
        } else if (c == ',') {
            commas++;
        } else if (c == '[' || c == '{') {
            opening++;
            depth++;
            if (!seen || depth > deepest)
                deepest = depth;
            seen = 1;
        } else if (c == ']' || c == '}') {
            closing++;
            depth--;
            if (!seen || depth > deepest)
                deepest = depth;
            seen = 1;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (unterminated)
        Py_RETURN_NONE;
    return Py_BuildValue("(LLLLL)", strings, commas, opening, closing, deepest);
}

static PyMethodDef methods[] = {
    {"counts", counts, METH_O, counts_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jsonshape",
    "The counts of an untrusted JSON document's shape in one pass (ckptmigrate.formats.boundedjson's fast path).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jsonshape(void) { return PyModule_Create(&module); }
