/* The state dict entries of data.pkl (a str key, a plain tensor reference) as pickle_writer's
 * _Writer._plain_ref writes them, many at once: the per-entry work of the common case in C.
 *
 * Only the common case is handled: the first entry that is anything else (a key or tensor already
 * memoised, a bit or attribute set, a dtype, layout or storage not seen yet, a string with lone
 * surrogates...) stops the run, with nothing of it written or recorded, and the pure-Python writer
 * takes it. The bytes are identical by construction: every opcode not built here comes from the
 * writer's own caches (its per-dtype prefix and its per-layout middles), and the rest is what
 * _plain_ref appends around them. No Python code runs here: every object whose attributes are read
 * is of an exact type (TensorRef, Storage: slotted dataclasses) and every dict and set lookup is
 * keyed by exact str, int, bytes or tuples of them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define BINPUT 'q'
#define LONG_BINPUT 'r'
#define BINUNICODE 'X'
#define TUPLE 't'
#define REDUCE 'R'
#define MAX_U32 0xFFFFFFFFLL

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (extra > PY_SSIZE_T_MAX - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = b->len + extra;
    if (need <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 65536;
    while (cap < need)
        cap = cap > PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    char *grown = PyMem_Realloc(b->data, (size_t)cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = grown;
    b->cap = cap;
    return 0;
}

/* Room reserved by the caller. */
static void put_bytes(Buf *b, const char *src, Py_ssize_t n) {
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
}

static void put_u32(Buf *b, unsigned long long v) {
    unsigned char *p = (unsigned char *)b->data + b->len;
    p[0] = (unsigned char)(v & 0xFF);
    p[1] = (unsigned char)((v >> 8) & 0xFF);
    p[2] = (unsigned char)((v >> 16) & 0xFF);
    p[3] = (unsigned char)((v >> 24) & 0xFF);
    b->len += 4;
}

/* Pickler.put at protocol 2 (at most 5 bytes). */
static void put_memo(Buf *b, long long idx) {
    if (idx < 256) {
        b->data[b->len++] = BINPUT;
        b->data[b->len++] = (char)idx;
    } else {
        b->data[b->len++] = LONG_BINPUT;
        put_u32(b, (unsigned long long)idx);
    }
}

/* BINUNICODE and the UTF-8 bytes (at most 5 + n). */
static void put_str(Buf *b, const char *raw, Py_ssize_t n) {
    b->data[b->len++] = BINUNICODE;
    put_u32(b, (unsigned long long)n);
    put_bytes(b, raw, n);
}

/* An attribute, as a new reference, or NULL (any error cleared: the entry is not handled). */
static PyObject *attr(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        PyErr_Clear();
    return value;
}

#define MAX_DIMS 64
#define TUPLE_BYTES (MAX_DIMS * 5 + 2)

/* A shape or stride as _int_tuple encodes it (the items as _int_op writes them, then the tuple
 * opcode) into ``buf`` (TUPLE_BYTES long): 1, or 0 when it is not a tuple of at most MAX_DIMS exact
 * ints of 32 bits (not handled). */
static int int_tuple(PyObject *t, unsigned char *buf, Py_ssize_t *size) {
    Py_ssize_t n, len = 0;
    if (!PyTuple_CheckExact(t) || (n = PyTuple_GET_SIZE(t)) > MAX_DIMS)
        return 0;
    if (n > 3)
        buf[len++] = '(';  /* MARK */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(t, i);
        int overflow;
        if (!PyLong_CheckExact(item))
            return 0;
        long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow || v < -2147483648LL || v > 2147483647LL)
            return 0;  /* LONG1: left to the pure path (an exact int never fails otherwise) */
        if (v >= 0 && v < 256) {
            buf[len++] = 'K';  /* BININT1 */
            buf[len++] = (unsigned char)v;
        } else if (v >= 0 && v < 65536) {
            buf[len++] = 'M';  /* BININT2 */
            buf[len++] = (unsigned char)(v & 0xFF);
            buf[len++] = (unsigned char)(v >> 8);
        } else {
            unsigned long long u = (unsigned long long)v;
            buf[len++] = 'J';  /* BININT, signed 32 bits little-endian */
            for (int k = 0; k < 4; k++)
                buf[len++] = (unsigned char)((u >> (8 * k)) & 0xFF);
        }
    }
    if (n == 0)
        buf[len++] = ')';  /* EMPTY_TUPLE */
    else if (n <= 3)
        buf[len++] = (unsigned char)(0x84 + n);  /* TUPLE1, TUPLE2, TUPLE3 */
    else
        buf[len++] = 't';  /* TUPLE */
    *size = len;
    return 1;
}

/* UTF-8 of an exact str, or NULL (lone surrogates: the pure path encodes them; error cleared). */
static const char *utf8(PyObject *s, Py_ssize_t *n) {
    const char *raw = PyUnicode_AsUTF8AndSize(s, n);
    if (raw == NULL)
        PyErr_Clear();
    else if ((long long)*n > MAX_U32)
        raw = NULL;
    return raw;
}

typedef struct {
    PyObject *storage, *key, *dtype, *location, *nbytes, *storage_offset, *shape, *stride;
    PyObject *requires_grad, *extra, *neg, *conj;
} Names;

static int names_init(Names *n) {
    memset(n, 0, sizeof(*n));
#define NAME(f) if ((n->f = PyUnicode_InternFromString(#f)) == NULL) return -1
    NAME(storage); NAME(key); NAME(dtype); NAME(location); NAME(nbytes); NAME(storage_offset);
    NAME(shape); NAME(stride); NAME(requires_grad); NAME(extra); NAME(neg); NAME(conj);
#undef NAME
    return 0;
}

static void names_clear(Names *n) {
    Py_CLEAR(n->storage); Py_CLEAR(n->key); Py_CLEAR(n->dtype); Py_CLEAR(n->location);
    Py_CLEAR(n->nbytes); Py_CLEAR(n->storage_offset); Py_CLEAR(n->shape); Py_CLEAR(n->stride);
    Py_CLEAR(n->requires_grad); Py_CLEAR(n->extra); Py_CLEAR(n->neg); Py_CLEAR(n->conj);
}

/* The layout of the entry written last and its middle: the next entry of the same dtype, device,
 * storage size, offset, shape, stride and requires_grad (most of them) reuses it without a lookup. */
typedef struct {
    PyObject *dtype, *location, *middle;  /* strong references, or NULL */
    long long numel, offset;
    int grad;
    Py_ssize_t shape_len, stride_len;
    unsigned char shape[TUPLE_BYTES], stride[TUPLE_BYTES];
} Layout;

static void layout_clear(Layout *l) {
    Py_CLEAR(l->dtype);
    Py_CLEAR(l->location);
    Py_CLEAR(l->middle);
}

/* A tuple (idx, obj) stored in the memo under ``ident`` (id(obj)), as the pickler memoises. */
static int memoise(PyObject *memo, PyObject *ident, PyObject *obj, long long idx) {
    int rc = -1;
    PyObject *pair = NULL, *index = PyLong_FromLongLong(idx);
    if (index != NULL && (pair = PyTuple_Pack(2, index, obj)) != NULL)
        rc = PyDict_SetItem(memo, ident, pair);
    Py_XDECREF(index);
    Py_XDECREF(pair);
    return rc;
}

/* The middle of a layout (new reference): the last one's, or the writer's from ``middles`` (the
 * four runs of opcodes between a tensor's puts, each bytes); NULL when the writer has not built it
 * (not handled) or on an error (raised). */
static PyObject *middle_of(Layout *now, Layout *last, PyObject *middles, PyObject *flag) {
    if (last->middle != NULL && now->dtype == last->dtype && now->location == last->location
        && now->numel == last->numel && now->offset == last->offset && now->grad == last->grad
        && now->shape_len == last->shape_len && now->stride_len == last->stride_len
        && memcmp(now->shape, last->shape, (size_t)now->shape_len) == 0
        && memcmp(now->stride, last->stride, (size_t)now->stride_len) == 0) {
        Py_INCREF(last->middle);
        return last->middle;
    }
    PyObject *numel = NULL, *offset = NULL, *shape = NULL, *stride = NULL, *template = NULL, *middle = NULL;
    if ((numel = PyLong_FromLongLong(now->numel)) == NULL || (offset = PyLong_FromLongLong(now->offset)) == NULL
        || (shape = PyBytes_FromStringAndSize((const char *)now->shape, now->shape_len)) == NULL
        || (stride = PyBytes_FromStringAndSize((const char *)now->stride, now->stride_len)) == NULL
        || (template = PyTuple_Pack(7, now->dtype, now->location, numel, offset, shape, stride, flag)) == NULL)
        goto done;
    /* the key _plain_ref builds: (dtype, device, numel, offset, shape op, stride op, flag op) */
    middle = PyDict_GetItemWithError(middles, template);  /* borrowed */
    if (middle == NULL || !PyTuple_CheckExact(middle) || PyTuple_GET_SIZE(middle) != 4) {
        middle = NULL;
        goto done;
    }
    for (int i = 0; i < 4; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(middle, i))) {
            middle = NULL;
            goto done;
        }
    }
    Py_INCREF(middle);
    layout_clear(last);
    *last = *now;
    Py_INCREF(last->dtype);
    Py_INCREF(last->location);
    Py_INCREF(middle);
    last->middle = middle;
done:
    Py_XDECREF(numel); Py_XDECREF(offset); Py_XDECREF(shape); Py_XDECREF(stride); Py_XDECREF(template);
    return middle;
}

typedef struct {
    PyObject *tensor_type, *storage_type, *memo, *texts, *plain, *middles, *itemsize, *by_storage, *taken, *records;
    PyObject *true_flag, *false_flag;
    Names names;
    Layout last;
} State;

/* A long long of an exact int, or 0 (not handled: too large). */
static int small_int(PyObject *obj, long long *value) {
    int overflow;
    if (!PyLong_CheckExact(obj))
        return 0;
    *value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    return !overflow;
}

/* Whether an encoded shape or stride is the empty tuple, which pickle does not put. */
static int empty_tuple(const Layout *l, int stride) {
    return stride ? l->stride_len == 1 && l->stride[0] == ')' : l->shape_len == 1 && l->shape[0] == ')';
}

/* The bytes of a tuple of bytes' item. */
#define PART(t, i) PyBytes_AS_STRING(PyTuple_GET_ITEM(t, i)), PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, i))

/* One entry from memo index *idx: 1 written and recorded (*idx the next index), 0 not handled
 * (nothing changed), -1 error (raised). */
static int entry(State *st, PyObject *item, long long *idx, Buf *out) {
    const Names *nm = &st->names;
    PyObject *key, *ref, *size, *seen, *prefix;  /* borrowed */
    PyObject *storage = NULL, *extra = NULL, *neg = NULL, *conj = NULL, *dtype = NULL, *offset = NULL;
    PyObject *shape = NULL, *stride = NULL, *grad = NULL, *location = NULL, *nbytes = NULL, *middle = NULL;
    PyObject *key_id = NULL, *ref_id = NULL, *storage_id = NULL, *record = NULL, *record_idx = NULL, *assigned = NULL;
    const char *key_raw, *record_raw;
    Py_ssize_t key_len, record_len, need;
    long long item_size, nbytes_value, i = *idx;
    Layout now;
    int rc = 0, found;

    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    key = PyTuple_GET_ITEM(item, 0);
    ref = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_CheckExact(key) || Py_TYPE(ref) != (PyTypeObject *)st->tensor_type)
        return 0;
    Py_INCREF(key);
    Py_INCREF(ref);
    if ((key_id = PyLong_FromVoidPtr(key)) == NULL || (ref_id = PyLong_FromVoidPtr(ref)) == NULL)
        goto error;
    if ((found = PyDict_Contains(st->memo, key_id)) != 0 || (found = PyDict_Contains(st->memo, ref_id)) != 0) {
        if (found < 0)
            goto error;
        goto done;
    }
    /* the bits and attributes: none set */
    if ((extra = attr(ref, nm->extra)) == NULL || !PyDict_CheckExact(extra) || PyDict_GET_SIZE(extra) != 0)
        goto done;
    if ((neg = attr(ref, nm->neg)) != Py_False || (conj = attr(ref, nm->conj)) != Py_False)
        goto done;
    if ((grad = attr(ref, nm->requires_grad)) != Py_True && grad != Py_False)
        goto done;
    if ((dtype = attr(ref, nm->dtype)) == NULL || !PyUnicode_CheckExact(dtype))
        goto done;
    /* the opcodes every plain tensor of the dtype starts with (borrowed: the dict is not changed here) */
    if ((prefix = PyDict_GetItemWithError(st->plain, dtype)) == NULL || !PyBytes_CheckExact(prefix)) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    now.dtype = dtype;
    now.grad = grad == Py_True;
    if ((offset = attr(ref, nm->storage_offset)) == NULL || !small_int(offset, &now.offset))
        goto done;
    if ((shape = attr(ref, nm->shape)) == NULL || !int_tuple(shape, now.shape, &now.shape_len))
        goto done;
    if ((stride = attr(ref, nm->stride)) == NULL || !int_tuple(stride, now.stride, &now.stride_len))
        goto done;
    if ((storage = attr(ref, nm->storage)) == NULL || Py_TYPE(storage) != (PyTypeObject *)st->storage_type)
        goto done;
    if ((location = attr(storage, nm->location)) == NULL || !PyUnicode_CheckExact(location))
        goto done;
    now.location = location;
    if ((nbytes = attr(storage, nm->nbytes)) == NULL || !small_int(nbytes, &nbytes_value) || nbytes_value < 0)
        goto done;
    if ((size = PyDict_GetItemWithError(st->itemsize, dtype)) == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    if (!small_int(size, &item_size) || item_size <= 0)
        goto done;  /* a size the pure path deals with (or fails on) */
    now.numel = nbytes_value / item_size;  /* both >= 0: Python's floor division */
    if ((middle = middle_of(&now, &st->last, st->middles, now.grad ? st->true_flag : st->false_flag)) == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    /* the storage record: the storage's own key when free and not in the memo (a storage seen
     * before is got back by its key's memo index: the pure path writes that) */
    if ((storage_id = PyLong_FromVoidPtr(storage)) == NULL)
        goto error;
    if ((seen = PyDict_GetItemWithError(st->by_storage, storage_id)) != NULL || PyErr_Occurred()) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    if ((record = attr(storage, nm->key)) == NULL || !PyUnicode_CheckExact(record))
        goto done;
    if ((found = PySet_Contains(st->taken, record)) != 0 || (found = PyDict_Contains(st->texts, record)) != 0) {
        if (found < 0)
            goto error;
        goto done;
    }
    if ((assigned = PyTuple_Pack(2, record, storage)) == NULL)
        goto error;
    key_raw = utf8(key, &key_len);
    record_raw = utf8(record, &record_len);
    if (key_raw == NULL || record_raw == NULL || i + 8 > MAX_U32)
        goto done;
    need = 5 + key_len + 5 + PyBytes_GET_SIZE(prefix) + 5 + record_len + 5 * 8 + 2;
    for (int k = 0; k < 4; k++)
        need += PyBytes_GET_SIZE(PyTuple_GET_ITEM(middle, k));
    if (buf_reserve(out, need) < 0)
        goto error;
    /* all checked: record the storage and memoise, then write, putting as torch puts: the key, the
     * storage key, the persistent id, the shape and stride (unless empty), the hooks' OrderedDict,
     * the arguments and the tensor */
    if (PySet_Add(st->taken, record) < 0 || PyDict_SetItem(st->by_storage, storage_id, assigned) < 0
        || PyList_Append(st->records, assigned) < 0)
        goto error;
    if (memoise(st->memo, key_id, key, i) < 0 || (record_idx = PyLong_FromLongLong(i + 1)) == NULL
        || PyDict_SetItem(st->texts, record, record_idx) < 0)
        goto error;
    put_str(out, key_raw, key_len);
    put_memo(out, i++);
    put_bytes(out, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix));
    put_str(out, record_raw, record_len);
    put_memo(out, i++);
    put_bytes(out, PART(middle, 0));
    put_memo(out, i++);
    put_bytes(out, PART(middle, 1));
    if (!empty_tuple(&now, 0))
        put_memo(out, i++);
    put_bytes(out, PART(middle, 2));
    if (!empty_tuple(&now, 1))
        put_memo(out, i++);
    put_bytes(out, PART(middle, 3));
    put_memo(out, i++);  /* the hooks' OrderedDict */
    out->data[out->len++] = TUPLE;
    put_memo(out, i++);  /* the arguments */
    out->data[out->len++] = REDUCE;
    if (memoise(st->memo, ref_id, ref, i) < 0)
        goto error;
    put_memo(out, i++);  /* the tensor */
    *idx = i;
    rc = 1;
    goto done;
error:
    rc = -1;
done:
    Py_DECREF(key);
    Py_DECREF(ref);
    Py_XDECREF(key_id); Py_XDECREF(ref_id); Py_XDECREF(storage_id); Py_XDECREF(record_idx);
    Py_XDECREF(storage); Py_XDECREF(extra); Py_XDECREF(neg); Py_XDECREF(conj); Py_XDECREF(grad);
    Py_XDECREF(dtype); Py_XDECREF(offset); Py_XDECREF(shape); Py_XDECREF(stride);
    Py_XDECREF(location); Py_XDECREF(nbytes); Py_XDECREF(middle);
    Py_XDECREF(record); Py_XDECREF(assigned);
    return rc;
}

PyDoc_STRVAR(entries_doc,
"entries(tensor_type, storage_type, memo, texts, plain, middles, itemsize, by_storage, taken, records, batch,\n"
"        pos, idx)\n"
"-> (bytes, count, next_idx)\n\n"
"The opcodes of batch[pos:pos + count], each a (str, TensorRef) entry written as _plain_ref writes it\n"
"from memo index idx on (the keys and tensors memoised, the storage keys in texts, the storages assigned to\n"
"records), and the memo index after them: the longest run from pos this handles; count 0 when it\n"
"handles none.");

static PyObject *entries(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "entries() takes 13 arguments");
        return NULL;
    }
    PyObject *batch = args[10];
    if (!PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyDict_CheckExact(args[2])
        || !PyDict_CheckExact(args[3]) || !PyDict_CheckExact(args[4]) || !PyDict_CheckExact(args[5])
        || !PyDict_CheckExact(args[6]) || !PyDict_CheckExact(args[7]) || !PySet_CheckExact(args[8])
        || !PyList_CheckExact(args[9]) || !PyList_CheckExact(batch)) {
        PyErr_SetString(PyExc_TypeError, "entries(): unexpected argument types");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[11]);
    long long idx = PyLong_AsLongLong(args[12]);
    if (PyErr_Occurred())
        return NULL;
    if (pos < 0 || idx < 0) {
        PyErr_SetString(PyExc_ValueError, "entries(): negative position or index");
        return NULL;
    }
    State st;
    memset(&st, 0, sizeof(st));
    st.tensor_type = args[0]; st.storage_type = args[1]; st.memo = args[2]; st.texts = args[3];
    st.plain = args[4]; st.middles = args[5]; st.itemsize = args[6]; st.by_storage = args[7];
    st.taken = args[8]; st.records = args[9];
    Buf out = {NULL, 0, 0};
    PyObject *result = NULL, *data = NULL;
    Py_ssize_t count = 0;
    if (names_init(&st.names) < 0)
        goto cleanup;
    if ((st.true_flag = PyBytes_FromStringAndSize("\x88", 1)) == NULL  /* NEWTRUE */
        || (st.false_flag = PyBytes_FromStringAndSize("\x89", 1)) == NULL)  /* NEWFALSE */
        goto cleanup;
    while (pos + count < PyList_GET_SIZE(batch)) {
        PyObject *item = PyList_GET_ITEM(batch, pos + count);
        Py_INCREF(item);
        int rc = entry(&st, item, &idx, &out);
        Py_DECREF(item);
        if (rc < 0)
            goto cleanup;
        if (rc == 0)
            break;
        count++;
    }
    data = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
    if (data != NULL)
        result = Py_BuildValue("(OnL)", data, count, idx);
cleanup:
    names_clear(&st.names);
    layout_clear(&st.last);
    Py_XDECREF(st.true_flag);
    Py_XDECREF(st.false_flag);
    Py_XDECREF(data);
    PyMem_Free(out.data);
    return result;
}

/* The text of one schema entry, {"dtype":DTYPE,"shape":[INTS]} as json.dumps(sort_keys=True) writes
 * it, into ``b`` (room reserved by the caller: 19 + len(dtype text) + 21 per dim). */
static void put_layout(Buf *b, const char *dtype, Py_ssize_t dtype_len, const long long *dims, Py_ssize_t n) {
    put_bytes(b, "{\"dtype\":", 9);
    put_bytes(b, dtype, dtype_len);
    put_bytes(b, ",\"shape\":[", 10);
    for (Py_ssize_t i = 0; i < n; i++) {
        char digits[24];
        int len = snprintf(digits, sizeof(digits), i ? ",%lld" : "%lld", dims[i]);
        put_bytes(b, digits, len);
    }
    put_bytes(b, "]}", 2);
}

/* Whether json's ASCII string encoder writes ``s`` unchanged between quotes: every character printable
 * ASCII (' ' to '~') but '"' and '\\' (its S_CHAR). */
static int plain_ascii(PyObject *s) {
    if (!PyUnicode_IS_ASCII(s))
        return 0;
    const unsigned char *p = (const unsigned char *)PyUnicode_DATA(s);
    for (Py_ssize_t i = 0, n = PyUnicode_GET_LENGTH(s); i < n; i++) {
        if (p[i] < ' ' || p[i] > '~' || p[i] == '"' || p[i] == '\\')
            return 0;
    }
    return 1;
}

/* ``encode(text)`` (json's C string encoder) as ASCII bytes, or NULL (not handled, or an error). */
static const char *encoded(PyObject *encode, PyObject *text, PyObject **holder, Py_ssize_t *len) {
    *holder = PyObject_CallOneArg(encode, text);
    if (*holder == NULL)
        return NULL;
    if (!PyUnicode_CheckExact(*holder) || !PyUnicode_IS_ASCII(*holder))
        return NULL;
    *len = PyUnicode_GET_LENGTH(*holder);
    return (const char *)PyUnicode_DATA(*holder);
}

PyDoc_STRVAR(schema_json_doc,
"schema_json(keys, schema, encode) -> str | None\n\n"
"json.dumps(schema, separators=(',', ':'), sort_keys=True) for a schema whose keys (``keys``, sorted)\n"
"are strings and whose entries are each {'shape': [ints], 'dtype': str}; ``encode`` is json's C\n"
"string encoder. None for any other schema (the pure path encodes it).");

static PyObject *schema_json(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "schema_json(keys: list, schema: dict, encode)");
        return NULL;
    }
    PyObject *keys = args[0], *schema = args[1], *encode = args[2];
    PyObject *shape_name = NULL, *dtype_name = NULL, *last_dtype = NULL, *result = NULL;
    PyObject *key_text = NULL, *dtype_text = NULL;
    Buf out = {NULL, 0, 0}, last = {NULL, 0, 0};  /* ``last``: the text of the entry before */
    long long dims[MAX_DIMS], last_dims[MAX_DIMS];
    Py_ssize_t last_n = -1, n_keys = PyList_GET_SIZE(keys);
    if (PyDict_GET_SIZE(schema) != n_keys)
        Py_RETURN_NONE;
    if ((shape_name = PyUnicode_InternFromString("shape")) == NULL
        || (dtype_name = PyUnicode_InternFromString("dtype")) == NULL || buf_reserve(&out, 2) < 0)
        goto cleanup;
    out.data[out.len++] = '{';
    for (Py_ssize_t i = 0; i < n_keys; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *value, *shape, *dtype;  /* borrowed */
        const char *text;
        Py_ssize_t n, text_len;
        if (!PyUnicode_CheckExact(key))
            goto unhandled;
        if ((value = PyDict_GetItemWithError(schema, key)) == NULL) {
            if (PyErr_Occurred())
                goto cleanup;
            goto unhandled;
        }
        if (!PyDict_CheckExact(value) || PyDict_GET_SIZE(value) != 2)
            goto unhandled;
        if ((shape = PyDict_GetItemWithError(value, shape_name)) == NULL
            || (dtype = PyDict_GetItemWithError(value, dtype_name)) == NULL) {
            if (PyErr_Occurred())
                goto cleanup;
            goto unhandled;
        }
        if (!PyList_CheckExact(shape) || !PyUnicode_CheckExact(dtype) || (n = PyList_GET_SIZE(shape)) > MAX_DIMS)
            goto unhandled;
        for (Py_ssize_t d = 0; d < n; d++) {  /* read before any call: the list cannot change meanwhile */
            PyObject *item = PyList_GET_ITEM(shape, d);
            int overflow;
            if (!PyLong_CheckExact(item))
                goto unhandled;  /* [True] == [1] == [1.0], whose text differs */
            dims[d] = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (overflow)
                goto unhandled;
        }
        Py_INCREF(dtype);  /* held: ``encode`` is called below */
        if (plain_ascii(key)) {  /* json writes it as it is, quoted */
            text_len = PyUnicode_GET_LENGTH(key);
            if (buf_reserve(&out, text_len + 4) < 0) {
                Py_DECREF(dtype);
                goto cleanup;
            }
            if (i)
                out.data[out.len++] = ',';
            out.data[out.len++] = '"';
            put_bytes(&out, (const char *)PyUnicode_DATA(key), text_len);
            out.data[out.len++] = '"';
        } else {
            Py_INCREF(key);
            text = encoded(encode, key, &key_text, &text_len);
            Py_DECREF(key);
            if (text == NULL || buf_reserve(&out, text_len + 2) < 0) {
                Py_DECREF(dtype);
                if (PyErr_Occurred())
                    goto cleanup;
                goto unhandled;
            }
            if (i)
                out.data[out.len++] = ',';
            put_bytes(&out, text, text_len);
            Py_CLEAR(key_text);
        }
        out.data[out.len++] = ':';
        if (dtype != last_dtype || n != last_n || memcmp(dims, last_dims, (size_t)n * sizeof(long long)) != 0) {
            Py_ssize_t dtype_len;
            const char *dtype_raw = encoded(encode, dtype, &dtype_text, &dtype_len);
            if (dtype_raw == NULL) {
                Py_DECREF(dtype);
                if (PyErr_Occurred())
                    goto cleanup;
                goto unhandled;
            }
            last.len = 0;
            if (buf_reserve(&last, 19 + dtype_len + 21 * n) < 0) {
                Py_DECREF(dtype);
                goto cleanup;
            }
            put_layout(&last, dtype_raw, dtype_len, dims, n);
            Py_CLEAR(dtype_text);
            Py_XSETREF(last_dtype, dtype);  /* the reference taken above */
            last_n = n;
            memcpy(last_dims, dims, (size_t)n * sizeof(long long));
        } else {
            Py_DECREF(dtype);
        }
        if (buf_reserve(&out, last.len) < 0)
            goto cleanup;
        put_bytes(&out, last.data, last.len);
    }
    if (buf_reserve(&out, 1) < 0)
        goto cleanup;
    out.data[out.len++] = '}';
    result = PyUnicode_DecodeASCII(out.data, out.len, NULL);
    goto cleanup;
unhandled:
    PyErr_Clear();
    result = Py_NewRef(Py_None);
cleanup:
    Py_XDECREF(shape_name);
    Py_XDECREF(dtype_name);
    Py_XDECREF(last_dtype);
    Py_XDECREF(key_text);
    Py_XDECREF(dtype_text);
    PyMem_Free(out.data);
    PyMem_Free(last.data);
    return result;
}

/* An exact int in [0, limit], or -1 (not handled). */
static long long bounded(PyObject *obj, long long limit) {
    int overflow;
    if (!PyLong_CheckExact(obj))
        return -1;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    return overflow || v < 0 || v > limit ? -1 : v;
}

static void put_u16(Buf *b, unsigned long v) {
    b->data[b->len++] = (char)(v & 0xFF);
    b->data[b->len++] = (char)((v >> 8) & 0xFF);
}

PyDoc_STRVAR(central_directory_doc,
"central_directory(entries) -> bytes | None\n\n"
"The central directory records of zipio's ZipLayout for ``entries`` (name bytes, header offset, size,\n"
"CRC), none of which needs zip64: each record as _CENTRAL packs it, then its name. None when any\n"
"entry is anything else (the pure path writes it, zip64 and all, or raises as struct does).");

static PyObject *central_directory(PyObject *self, PyObject *entries) {
    (void)self;
    if (!PyList_CheckExact(entries)) {
        PyErr_SetString(PyExc_TypeError, "central_directory(entries: list)");
        return NULL;
    }
    Buf out = {NULL, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i);  /* borrowed: nothing here runs code */
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4 || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 0)))
            goto unhandled;
        PyObject *name = PyTuple_GET_ITEM(entry, 0);
        Py_ssize_t name_len = PyBytes_GET_SIZE(name);
        long long offset = bounded(PyTuple_GET_ITEM(entry, 1), MAX_U32 - 1);
        long long size = bounded(PyTuple_GET_ITEM(entry, 2), MAX_U32 - 1);
        long long crc = bounded(PyTuple_GET_ITEM(entry, 3), MAX_U32);
        if (offset < 0 || size < 0 || crc < 0 || name_len > 0xFFFF)
            goto unhandled;
        if (buf_reserve(&out, 46 + name_len) < 0)
            goto cleanup;
        put_u32(&out, 0x02014B50);
        put_u16(&out, 20);  /* version made by */
        put_u16(&out, 20);  /* version needed */
        for (int k = 0; k < 4; k++)
            put_u16(&out, 0);  /* flags, method (stored), time, date */
        put_u32(&out, (unsigned long long)crc);
        put_u32(&out, (unsigned long long)size);
        put_u32(&out, (unsigned long long)size);
        put_u16(&out, (unsigned long)name_len);
        for (int k = 0; k < 4; k++)
            put_u16(&out, 0);  /* extra, comment, disk, internal attributes */
        put_u32(&out, 0);  /* external attributes */
        put_u32(&out, (unsigned long long)offset);
        put_bytes(&out, PyBytes_AS_STRING(name), name_len);
    }
    result = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
    goto cleanup;
unhandled:
    result = Py_NewRef(Py_None);
cleanup:
    PyMem_Free(out.data);
    return result;
}

static PyMethodDef methods[] = {
    {"entries", (PyCFunction)(void (*)(void))entries, METH_FASTCALL, entries_doc},
    {"schema_json", (PyCFunction)(void (*)(void))schema_json, METH_FASTCALL, schema_json_doc},
    {"central_directory", central_directory, METH_O, central_directory_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_encode",
    "The state dict entries of data.pkl written in C (ckptmigrate.formats.pickle_writer's fast path).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__encode(void) { return PyModule_Create(&module); }
