/* The runs of keys and tensors of a state dict's data.pkl, decoded in C: the fast path of
 * ckptmigrate.formats.pickle_direct._Decoder.tiles.
 *
 * scan() reads, from a BINUNICODE key, unit after unit of a key and its tensor in the one form
 * torch pickles all but the first ~30 of a state dict (every put a LONG_BINPUT with the next memo
 * index, the storage key a new string of digits, every other argument a memo get), opcode by
 * opcode, and decodes each unit exactly as the opcode-by-opcode read would: the same strings,
 * Storage and TensorRef objects, memo entries and stack items. It stops before the first unit it
 * does not take whole (anything else in the bytes, a check that fails, a key that is not UTF-8):
 * the caller reads on from there, opcode by opcode, and decides. What depends on the memo (the
 * gets) and on the rebuild call (a layout) is resolved by the caller's functions, once per
 * distinct bytes, and remembered in the caller's dicts. Every read is bounds-checked; no state
 * outlives a call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

/* A layout's key (storage type get, numel, offset, shape, stride opcodes) longer than this is
 * handed back (a tensor of dozens of dimensions). */
#define MAX_LAYOUT_KEY 256
/* the five gets of a unit: rebuild function, "storage", storage type, location, OrderedDict */
#define MAX_GETS_KEY 25

typedef struct {
    const unsigned char *buf;
    Py_ssize_t len;
} Bytes;

static uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Length of the BININT1/BININT2/BININT at pos, 0 if none. */
static Py_ssize_t int_op(Bytes b, Py_ssize_t pos) {
    if (pos >= b.len) return 0;
    Py_ssize_t n = b.buf[pos] == 'K' ? 2 : b.buf[pos] == 'M' ? 3 : b.buf[pos] == 'J' ? 5 : 0;
    return n && n <= b.len - pos ? n : 0;
}

/* Length of the BINGET/LONG_BINGET at pos, 0 if none. */
static Py_ssize_t get_op(Bytes b, Py_ssize_t pos) {
    if (pos >= b.len) return 0;
    Py_ssize_t n = b.buf[pos] == 'h' ? 2 : b.buf[pos] == 'j' ? 5 : 0;
    return n && n <= b.len - pos ? n : 0;
}

/* Length of a tuple of ints at pos: EMPTY_TUPLE, one to three ints and TUPLE1-3, or MARK, ints
 * and TUPLE; 0 if none. */
static Py_ssize_t tuple_op(Bytes b, Py_ssize_t pos) {
    if (pos >= b.len) return 0;
    if (b.buf[pos] == ')') return 1;
    Py_ssize_t p = pos, n;
    if (b.buf[pos] == '(') {
        p++;
        while ((n = int_op(b, p)) != 0) p += n;
        return p < b.len && b.buf[p] == 't' ? p + 1 - pos : 0;
    }
    int count = 0;
    while (count < 3 && (n = int_op(b, p)) != 0) {
        p += n;
        count++;
    }
    return count && p < b.len && b.buf[p] == 0x84 + count ? p + 1 - pos : 0;
}

/* Whether a LONG_BINPUT of memo index ``index`` is at pos. */
static int put_op(Bytes b, Py_ssize_t pos, Py_ssize_t index) {
    return pos < b.len && b.len - pos >= 5 && b.buf[pos] == 'r' && (Py_ssize_t)u32(b.buf + pos + 1) == index;
}

static int byte_is(Bytes b, Py_ssize_t pos, unsigned char c) {
    return pos < b.len && b.buf[pos] == c;
}

static long int_value(const unsigned char *op) {
    if (op[0] == 'K') return op[1];
    if (op[0] == 'M') return (long)op[1] | ((long)op[2] << 8);
    return (long)(int32_t)u32(op + 1);
}

/* Where one unit's parts are, as offsets into the bytes. */
typedef struct {
    Py_ssize_t key, key_len, gets[5], gets_len[5], skey, skey_len, numel, numel_len;
    Py_ssize_t offset, offset_len, shape, shape_len, stride, stride_len, end;
    int grad;
} Unit;

/* The unit at pos whose first put is memo index ``m``: 1 when it is one, else 0. */
static int parse_unit(Bytes b, Py_ssize_t pos, Py_ssize_t m, Py_ssize_t max_key, Unit *u) {
    Py_ssize_t p = pos, n;
    if (!byte_is(b, p, 'X') || b.len - p < 5) return 0;
    u->key_len = (Py_ssize_t)u32(b.buf + p + 1);
    u->key = p + 5;
    if (u->key_len > max_key || u->key_len > b.len - u->key) return 0;
    p = u->key + u->key_len;
    if (!put_op(b, p, m)) return 0;
    p += 5;
#define GET(i) \
    if ((n = get_op(b, p)) == 0) return 0; \
    u->gets[i] = p; u->gets_len[i] = n; p += n;
    GET(0)
    if (!byte_is(b, p, '(') || !byte_is(b, p + 1, '(')) return 0;
    p += 2;
    GET(1)
    GET(2)
    /* the storage key: BINUNICODE of 1 to 127 digits */
    if (!byte_is(b, p, 'X') || b.len - p < 5) return 0;
    u->skey_len = b.buf[p + 1];
    if (u->skey_len < 1 || u->skey_len > 127 || b.buf[p + 2] || b.buf[p + 3] || b.buf[p + 4]) return 0;
    u->skey = p + 5;
    if (u->skey_len > b.len - u->skey) return 0;
    for (Py_ssize_t i = 0; i < u->skey_len; i++) {
        if (b.buf[u->skey + i] < '0' || b.buf[u->skey + i] > '9') return 0;
    }
    p = u->skey + u->skey_len;
    if (!put_op(b, p, m + 1)) return 0;
    p += 5;
    GET(3)
    if ((n = int_op(b, p)) == 0) return 0;
    u->numel = p; u->numel_len = n; p += n;
    if (!byte_is(b, p, 't') || !put_op(b, p + 1, m + 2) || !byte_is(b, p + 6, 'Q')) return 0;
    p += 7;
    if ((n = int_op(b, p)) == 0) return 0;
    u->offset = p; u->offset_len = n; p += n;
    if ((n = tuple_op(b, p)) == 0) return 0;
    u->shape = p; u->shape_len = n; p += n;
    if (!put_op(b, p, m + 3)) return 0;
    p += 5;
    if ((n = tuple_op(b, p)) == 0) return 0;
    u->stride = p; u->stride_len = n; p += n;
    if (!put_op(b, p, m + 4)) return 0;
    p += 5;
    if (!byte_is(b, p, 0x88) && !byte_is(b, p, 0x89)) return 0;
    u->grad = b.buf[p] == 0x88;
    p++;
    GET(4)
#undef GET
    if (!byte_is(b, p, ')') || !byte_is(b, p + 1, 'R') || !put_op(b, p + 2, m + 5) || !byte_is(b, p + 7, 't')
        || !put_op(b, p + 8, m + 6) || !byte_is(b, p + 13, 'R') || !put_op(b, p + 14, m + 7)) return 0;
    u->end = p + 19;
    return 1;
}

/* resolve(*args) for ``key``, remembered in ``cache`` when it is not None: a new reference;
 * Py_None when it hands the unit back; NULL on an error. */
static PyObject *resolved(PyObject *cache, PyObject *key, PyObject *resolve, PyObject *const *args, size_t nargs) {
    PyObject *value = PyObject_Vectorcall(resolve, args, nargs, NULL);
    if (value == NULL || value == Py_None) return value;
    if (!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 3) {
        PyErr_SetString(PyExc_TypeError, "a resolver must return a 3-tuple or None");
        Py_DECREF(value);
        return NULL;
    }
    if (PyDict_SetItem(cache, key, value) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

static PyObject *bytes_of(Bytes b, Py_ssize_t start, Py_ssize_t n) {
    return PyBytes_FromStringAndSize((const char *)b.buf + start, n);
}

/* An object of a dataclass as its __init__ makes it, without running it: ``maker`` is the class
 * (called, when the caller found its __init__ may do more) or (class, fields): each field's slot
 * descriptor, default and whether that is a factory to call, in __init__'s order; the first
 * ``nargs`` fields are given. Each value is stored in its slot as the descriptor's __set__ would
 * (valid_maker checked the slots). A new reference, NULL on an error. */
static PyObject *make(PyObject *maker, PyObject *const *args, Py_ssize_t nargs) {
    if (!PyTuple_CheckExact(maker)) return PyObject_Vectorcall(maker, args, (size_t)nargs, NULL);
    PyTypeObject *type = (PyTypeObject *)PyTuple_GET_ITEM(maker, 0);
    PyObject *fields = PyTuple_GET_ITEM(maker, 1);
    PyObject *obj = type->tp_alloc(type, 0);
    if (obj == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i), *value;
        if (i < nargs) {
            value = args[i];
            Py_INCREF(value);
        } else if (PyTuple_GET_ITEM(field, 2) == Py_True) {
            PyObject *factory = PyTuple_GET_ITEM(field, 1);
            value = factory == (PyObject *)&PyDict_Type ? PyDict_New() : PyObject_CallNoArgs(factory);
            if (value == NULL) {
                Py_DECREF(obj);
                return NULL;
            }
        } else {
            value = PyTuple_GET_ITEM(field, 1);
            Py_INCREF(value);
        }
        PyObject **slot = (PyObject **)((char *)obj + ((PyMemberDescrObject *)PyTuple_GET_ITEM(field, 0))->d_member->offset);
        Py_XSETREF(*slot, value);
    }
    return obj;
}

/* Whether ``maker`` is a class or (class, fields) as make() takes them: each field's descriptor a
 * writable object slot of that class, inside its instances. */
static int valid_maker(PyObject *maker, Py_ssize_t nargs) {
    if (PyType_Check(maker)) return 1;
    if (!PyTuple_CheckExact(maker) || PyTuple_GET_SIZE(maker) != 2 || !PyType_Check(PyTuple_GET_ITEM(maker, 0))
        || !PyTuple_CheckExact(PyTuple_GET_ITEM(maker, 1)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(maker, 1)) < nargs)
        return 0;
    PyTypeObject *type = (PyTypeObject *)PyTuple_GET_ITEM(maker, 0);
    PyObject *fields = PyTuple_GET_ITEM(maker, 1);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 3
            || !Py_IS_TYPE(PyTuple_GET_ITEM(field, 0), &PyMemberDescr_Type))
            return 0;
        PyMemberDescrObject *descr = (PyMemberDescrObject *)PyTuple_GET_ITEM(field, 0);
        PyMemberDef *member = descr->d_member;
        if (PyDescr_TYPE(descr) != type || member->type != T_OBJECT_EX || (member->flags & READONLY)
            || member->offset < (Py_ssize_t)sizeof(PyObject)
            || member->offset > type->tp_basicsize - (Py_ssize_t)sizeof(PyObject *))
            return 0;
    }
    return 1;
}

PyDoc_STRVAR(scan_doc,
"scan(data, pos, max_key, memo, stack, mine, storages, gets, layouts, resolve_gets, resolve_layout,\n"
"     storage_type, tensor_type) -> int | None\n\n"
"Decode the units of a key and its tensor from the BINUNICODE at pos, appending each key and\n"
"tensor to stack, their memo entries to memo and each new storage to mine; the position after\n"
"the last unit taken, or None when none is.");

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 13 arguments");
        return NULL;
    }
    PyObject *data = args[0], *memo = args[3], *stack = args[4], *mine = args[5], *storages = args[6];
    PyObject *gets_cache = args[7], *layouts_cache = args[8], *resolve_gets = args[9];
    PyObject *resolve_layout = args[10], *storage_type = args[11], *tensor_type = args[12];
    if (!PyBytes_CheckExact(data) || !PyList_CheckExact(memo) || !PyList_CheckExact(stack)
        || !PyDict_Check(mine) || !PyDict_Check(storages) || !PyDict_CheckExact(gets_cache)
        || !PyDict_CheckExact(layouts_cache)) {
        PyErr_SetString(PyExc_TypeError, "scan() got an argument of the wrong type");
        return NULL;
    }
    if (!PyDict_CheckExact(mine) || !PyDict_CheckExact(storages)) Py_RETURN_NONE;  /* lookups of their own */
    if (!valid_maker(storage_type, 4) || !valid_maker(tensor_type, 6)) {
        PyErr_SetString(PyExc_TypeError, "scan() got a class that is not a class or (class, fields)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t max_key = PyLong_AsSsize_t(args[2]);
    if (max_key == -1 && PyErr_Occurred()) return NULL;
    Bytes b = {(const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)};
    if (pos < 0 || pos > b.len) {
        PyErr_SetString(PyExc_ValueError, "scan() position out of range");
        return NULL;
    }

    PyObject *gets_value = NULL;  /* (dtype, itemsize, location) of the last gets met */
    unsigned char last_gets[MAX_GETS_KEY];
    Py_ssize_t last_gets_len = 0;
    unsigned char layout[MAX_LAYOUT_KEY], last_layout[MAX_LAYOUT_KEY];
    Py_ssize_t last_layout_len = 0;
    PyObject *lvalue = NULL;  /* (offset, shape, stride) of the last layout met */
    Py_ssize_t taken = 0;
    PyObject *key = NULL, *skey = NULL, *storage = NULL, *ref = NULL, *lkey = NULL;
    PyObject *nbytes = NULL, *result = NULL;
    Unit u;
    for (;;) {
        Py_ssize_t m = PyList_GET_SIZE(memo);
        if (!parse_unit(b, pos, m, max_key, &u)) break;

        /* the gets: the same bytes as the last unit's (most often), or resolved by the caller */
        unsigned char gets[MAX_GETS_KEY];
        Py_ssize_t gets_len = 0;
        for (int i = 0; i < 5; i++) {
            memcpy(gets + gets_len, b.buf + u.gets[i], (size_t)u.gets_len[i]);
            gets_len += u.gets_len[i];
        }
        if (gets_value == NULL || gets_len != last_gets_len || memcmp(gets, last_gets, (size_t)gets_len)) {
            Py_CLEAR(gets_value);
            PyObject *gkey = PyBytes_FromStringAndSize((const char *)gets, gets_len);
            if (gkey == NULL) goto error;
            PyObject *gargs[2] = {gkey, NULL};
            gargs[1] = PyLong_FromSsize_t(m);
            if (gargs[1] == NULL) {
                Py_DECREF(gkey);
                goto error;
            }
            gets_value = PyDict_GetItemWithError(gets_cache, gkey);
            Py_XINCREF(gets_value);
            if (gets_value == NULL && !PyErr_Occurred())
                gets_value = resolved(gets_cache, gkey, resolve_gets, gargs, 2);
            Py_DECREF(gkey);
            Py_DECREF(gargs[1]);
            if (gets_value == NULL) goto error;
            if (gets_value == Py_None) {
                Py_CLEAR(gets_value);
                break;
            }
            memcpy(last_gets, gets, (size_t)gets_len);
            last_gets_len = gets_len;
        }
        PyObject *dtype = PyTuple_GET_ITEM(gets_value, 0), *location = PyTuple_GET_ITEM(gets_value, 2);
        long itemsize = PyLong_AsLong(PyTuple_GET_ITEM(gets_value, 1));
        if (itemsize == -1 && PyErr_Occurred()) goto error;
        if (itemsize < 1 || itemsize > 64) {
            PyErr_SetString(PyExc_ValueError, "scan() got an unknown item size");
            goto error;
        }
        long numel = int_value(b.buf + u.numel);
        if (numel < 0) break;

        /* the storage: a new key (not met before, in this run or outside it: mine is checked when the
         * unit is taken) */
        skey = PyUnicode_DecodeASCII((const char *)b.buf + u.skey, u.skey_len, "strict");
        if (skey == NULL) goto error;
        int known = storages != mine && PyDict_GET_SIZE(storages) ? PyDict_Contains(storages, skey) : 0;
        if (known < 0) goto error;
        if (known) break;
        key = PyUnicode_DecodeUTF8((const char *)b.buf + u.key, u.key_len, "surrogatepass");
        if (key == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) goto error;
            PyErr_Clear();
            break;
        }
        nbytes = PyLong_FromLongLong((long long)numel * itemsize);
        if (nbytes == NULL) goto error;
        PyObject *sargs[4] = {skey, dtype, location, nbytes};
        storage = make(storage_type, sargs, 4);
        if (storage == NULL) goto error;

        /* the layout: accepted by the rebuild call once per distinct bytes */
        Py_ssize_t parts[4][2] = {{u.numel, u.numel_len}, {u.offset, u.offset_len}, {u.shape, u.shape_len},
                                  {u.stride, u.stride_len}};
        Py_ssize_t layout_len = u.gets_len[2];
        memcpy(layout, b.buf + u.gets[2], (size_t)layout_len);
        int fits = 1;
        for (int i = 0; i < 4 && fits; i++) {
            if (parts[i][1] > MAX_LAYOUT_KEY - layout_len) {
                fits = 0;
                break;
            }
            memcpy(layout + layout_len, b.buf + parts[i][0], (size_t)parts[i][1]);
            layout_len += parts[i][1];
        }
        if (!fits) break;
        if (lvalue == NULL || layout_len != last_layout_len || memcmp(layout, last_layout, (size_t)layout_len)) {
            Py_CLEAR(lvalue);
            lkey = PyBytes_FromStringAndSize((const char *)layout, layout_len);
            if (lkey == NULL) goto error;
            lvalue = PyDict_GetItemWithError(layouts_cache, lkey);
            Py_XINCREF(lvalue);
            if (lvalue == NULL) {
                if (PyErr_Occurred()) goto error;
                PyObject *largs[5] = {NULL, NULL, NULL, storage, u.grad ? Py_True : Py_False};
                largs[0] = bytes_of(b, u.offset, u.offset_len);
                largs[1] = bytes_of(b, u.shape, u.shape_len);
                largs[2] = bytes_of(b, u.stride, u.stride_len);
                if (largs[0] != NULL && largs[1] != NULL && largs[2] != NULL)
                    lvalue = resolved(layouts_cache, lkey, resolve_layout, largs, 5);
                Py_XDECREF(largs[0]);
                Py_XDECREF(largs[1]);
                Py_XDECREF(largs[2]);
                if (lvalue == NULL) goto error;
                if (lvalue == Py_None) break;
            }
            Py_CLEAR(lkey);
            memcpy(last_layout, layout, (size_t)layout_len);
            last_layout_len = layout_len;
        }
        PyObject *targs[6] = {storage, PyTuple_GET_ITEM(lvalue, 0), PyTuple_GET_ITEM(lvalue, 1),
                              PyTuple_GET_ITEM(lvalue, 2), dtype, u.grad ? Py_True : Py_False};
        ref = make(tensor_type, targs, 6);
        if (ref == NULL) goto error;

        /* the unit taken, unless its storage key is in mine already: what the opcode-by-opcode read leaves */
        PyObject *there = PyDict_SetDefault(mine, skey, storage);
        if (there == NULL) goto error;
        if (there != storage) break;
        if (PyList_Append(memo, key) < 0 || PyList_Append(memo, skey) < 0) goto error;
        for (int i = 0; i < 5; i++) {
            if (PyList_Append(memo, Py_None) < 0) goto error;
        }
        if (PyList_Append(memo, ref) < 0 || PyList_Append(stack, key) < 0 || PyList_Append(stack, ref) < 0)
            goto error;
        Py_CLEAR(key);
        Py_CLEAR(skey);
        Py_CLEAR(storage);
        Py_CLEAR(ref);
        Py_CLEAR(nbytes);
        pos = u.end;
        taken++;
    }
    result = taken == 0 ? Py_NewRef(Py_None) : PyLong_FromSsize_t(pos);
error:  /* and the end of every run: what the last unit left held */
    Py_XDECREF(gets_value);
    Py_XDECREF(key);
    Py_XDECREF(skey);
    Py_XDECREF(storage);
    Py_XDECREF(ref);
    Py_XDECREF(lkey);
    Py_XDECREF(lvalue);
    Py_XDECREF(nbytes);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tiles",
    "The runs of keys and tensors of a state dict's data.pkl, decoded in C (pickle_direct's fast path).",
    0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tiles(void) {
    return PyModule_Create(&module);
}
