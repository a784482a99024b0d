/* The common case of zipread's parse in C: a central directory, its names and the walk of the
 * local records as torch writes them. Every function gives what the pure-Python code gives, or
 * None (or no progress) for anything else, which the Python code then reads and judges: errors
 * and their messages stay the Python ones. The bytes are untrusted: every read is checked against
 * the buffer's length first. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX32 0xFFFFFFFFULL
#define MAX_VERSION_NEEDED 45
#define FLAG_DESCRIPTOR 0x0008
#define FLAGS_ALLOWED (FLAG_DESCRIPTOR | 0x0800)
#define DOS_DIRECTORY 0x10
#define TAG_ZIP64 0x0001
#define TAG_PADDING 0x4246
#define SIG_CENTRAL 0x02014B50UL
#define SIG_LOCAL 0x04034B50UL
#define SIG_DESCRIPTOR 0x08074B50UL
#define TORCH_NAME_BUFFER 512

static unsigned u16(const unsigned char *p) { return (unsigned)p[0] | (unsigned)p[1] << 8; }

static unsigned long u32(const unsigned char *p) {
    return (unsigned long)p[0] | (unsigned long)p[1] << 8 | (unsigned long)p[2] << 16 | (unsigned long)p[3] << 24;
}

static unsigned long long u64(const unsigned char *p) {
    return (unsigned long long)u32(p) | (unsigned long long)u32(p + 4) << 32;
}

/* zipformat.CANONICAL: printable ASCII parts without '/' or '\\', at least two, none "." or "..".
 * The bytes are checked in one branch-free pass (vectorised), then the parts between slashes. */
static int canonical(const unsigned char *s, Py_ssize_t n) {
    unsigned bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad |= (unsigned)(s[i] < 0x20) | (unsigned)(s[i] > 0x7E) | (unsigned)(s[i] == '\\');
    if (bad)
        return 0;
    Py_ssize_t parts = 0;
    const unsigned char *part = s, *end = s + n;
    for (;;) {
        const unsigned char *slash = memchr(part, '/', (size_t)(end - part));
        const unsigned char *stop = slash != NULL ? slash : end;
        Py_ssize_t len = stop - part;
        if (len == 0 || (len == 1 && part[0] == '.') || (len == 2 && part[0] == '.' && part[1] == '.'))
            return 0;
        parts++;
        if (slash == NULL)
            return parts >= 2;
        part = slash + 1;
    }
}

/* A printable ASCII str of the n bytes at s (checked by the caller). */
static PyObject *ascii_str(const unsigned char *s, Py_ssize_t n) {
    PyObject *out = PyUnicode_New(n, 127);
    if (out != NULL)
        memcpy(PyUnicode_DATA(out), s, (size_t)n);
    return out;
}

/* An instance of the tuple subclass `type` (a NamedTuple) holding `items`, stolen (NULLs allowed:
 * then it fails and drops the others), as tuple.__new__(type, items) builds it. Its items are str,
 * bytes and int and a NamedTuple has no __dict__: it can be in no reference cycle, so the cyclic
 * collector is spared it (for a plain tuple, the collector itself would untrack it). */
static PyObject *named(PyTypeObject *type, PyObject **items, Py_ssize_t n) {
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    out = type->tp_alloc(type, n);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(out, i, items[i]);
    if (PyObject_GC_IsTracked(out))
        PyObject_GC_UnTrack(out);
    return out;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static int is_named_tuple_type(PyObject *type, Py_ssize_t fields) {
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)
            || ((PyTypeObject *)type)->tp_dictoffset != 0)
        return 0;
    PyObject *names = PyObject_GetAttrString(type, "_fields");
    if (names == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = PyTuple_Check(names) && PyTuple_GET_SIZE(names) == fields;
    Py_DECREF(names);
    return ok;
}

PyDoc_STRVAR(directory_doc,
"directory(cd, count, central_type) -> list | None\n\n"
"DirectoryReader.directory of a central directory whose entries all have canonical names and no extra\n"
"field but a zip64 one, as torch writes them; None for anything else.");

static PyObject *directory(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Py_ssize_t count;
    PyObject *type;
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "y*nO", &view, &count, &type))
        return NULL;
    if (!is_named_tuple_type(type, 6)) {
        PyErr_SetString(PyExc_TypeError, "central_type must be a 6-field NamedTuple class");
        goto done;
    }
    const unsigned char *cd = view.buf;
    Py_ssize_t len = view.len, pos = 0;
    if (count < 0 || count > len / 46)
        goto refuse;
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (len - pos < 46)
            goto refuse;
        const unsigned char *e = cd + pos;
        unsigned needed = u16(e + 6), flags = u16(e + 8), method = u16(e + 10);
        unsigned long crc = u32(e + 16);
        unsigned long long values[3] = {u32(e + 24), u32(e + 20), u32(e + 42)}; /* usize, csize, offset */
        Py_ssize_t nlen = u16(e + 28), xlen = u16(e + 30), clen = u16(e + 32);
        unsigned disk = u16(e + 34);
        unsigned long eattr = u32(e + 38);
        if (u32(e) != SIG_CENTRAL || len - pos - 46 < nlen + xlen + clen)
            goto refuse;
        const unsigned char *name = e + 46;
        if (!canonical(name, nlen) || needed > MAX_VERSION_NEEDED || (flags & ~FLAGS_ALLOWED) || method != 0
                || clen || disk || (eattr & DOS_DIRECTORY))
            goto refuse;
        int wanted = (values[0] == MAX32) + (values[1] == MAX32) + (values[2] == MAX32);
        if (xlen || wanted) {
            /* one zip64 field filling the extra field, with exactly the values it replaces */
            const unsigned char *x = name + nlen;
            if (xlen < 4 || u16(x) != TAG_ZIP64 || (Py_ssize_t)u16(x + 2) != 8 * wanted || xlen != 4 + 8 * wanted)
                goto refuse;
            const unsigned char *field = x + 4;
            for (int k = 0; k < 3; k++)
                if (values[k] == MAX32) {
                    values[k] = u64(field);
                    field += 8;
                }
        }
        if (values[0] != values[1])
            goto refuse;
        PyObject *items[6] = {
            PyBytes_FromStringAndSize((const char *)name, nlen), ascii_str(name, nlen),
            PyLong_FromUnsignedLong(flags), PyLong_FromUnsignedLong(crc),
            PyLong_FromUnsignedLongLong(values[0]), PyLong_FromUnsignedLongLong(values[2]),
        };
        PyObject *central = named((PyTypeObject *)type, items, 6);
        if (central == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, central);
        pos += 46 + nlen + xlen + clen;
    }
    if (pos != len)
        goto refuse;
    goto done;
refuse:
    Py_XDECREF(out);
    out = Py_NewRef(Py_None);
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&view);
    return out;
}

/* `s` (ASCII) lower-cased as str.lower does, or a new reference to it when it has no upper case. */
static PyObject *ascii_lower(PyObject *s) {
    const unsigned char *p = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), i;
    unsigned upper = 0;
    for (i = 0; i < n; i++) /* branch-free: vectorised */
        upper |= (unsigned)((unsigned char)(p[i] - 'A') < 26);
    if (!upper)
        return Py_NewRef(s);
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL)
        return NULL;
    unsigned char *q = PyUnicode_DATA(out);
    for (i = 0; i < n; i++)
        q[i] = (p[i] >= 'A' && p[i] <= 'Z') ? (unsigned char)(p[i] + 32) : p[i];
    return out;
}

/* The item i of a CentralEntry or ZipEntry, when `t` is a tuple long enough. */
static PyObject *field(PyObject *t, Py_ssize_t i) {
    return PyTuple_Check(t) && PyTuple_GET_SIZE(t) > i ? PyTuple_GET_ITEM(t, i) : NULL;
}

PyDoc_STRVAR(names_doc,
"names(centrals, prefix) -> (prefix, live) | None\n\n"
"DirectoryReader.check_names (the archive's folder: prefix, or None to take the first record's) then\n"
"by_header, when both accept the directory; None for anything they would refuse.");

static PyObject *names(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *centrals, *prefix;
    PyObject *seen = NULL, *live = NULL, *own_prefix = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &centrals, &prefix))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(centrals);
    if (n == 0)
        goto refuse;
    if (prefix == Py_None) {
        PyObject *first = PyList_GET_ITEM(centrals, 0);
        PyObject *raw = field(first, 0), *name = field(first, 1);
        if (raw == NULL || name == NULL || !PyBytes_Check(raw) || !PyUnicode_Check(name)
                || !PyUnicode_IS_COMPACT_ASCII(name))
            goto refuse;
        Py_ssize_t reach = PyBytes_GET_SIZE(raw) < TORCH_NAME_BUFFER - 1 ? PyBytes_GET_SIZE(raw) : TORCH_NAME_BUFFER - 1;
        if (memchr(PyBytes_AS_STRING(raw), '/', (size_t)reach) == NULL)
            goto refuse;
        const char *s = PyUnicode_DATA(name);
        const char *slash = memchr(s, '/', (size_t)PyUnicode_GET_LENGTH(name));
        if (slash == NULL || slash == s)
            goto refuse;
        own_prefix = PyUnicode_Substring(name, 0, slash - s);
        if (own_prefix == NULL)
            goto fail;
        prefix = own_prefix;
    } else if (!PyUnicode_Check(prefix) || !PyUnicode_IS_COMPACT_ASCII(prefix) || PyUnicode_GET_LENGTH(prefix) == 0) {
        goto refuse;
    }
    const char *folder = PyUnicode_DATA(prefix);
    Py_ssize_t flen = PyUnicode_GET_LENGTH(prefix);
    seen = PySet_New(NULL);
    live = PyDict_New();
    if (seen == NULL || live == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyList_GET_ITEM(centrals, i);
        PyObject *name = field(c, 1), *offset = field(c, 5);
        if (name == NULL || offset == NULL || !PyUnicode_Check(name) || !PyUnicode_IS_COMPACT_ASCII(name))
            goto refuse;
        const char *s = PyUnicode_DATA(name);
        if (PyUnicode_GET_LENGTH(name) <= flen || memcmp(s, folder, (size_t)flen) != 0 || s[flen] != '/')
            goto refuse;
        PyObject *folded = ascii_lower(name);
        if (folded == NULL)
            goto fail;
        int added = PySet_Add(seen, folded);
        Py_DECREF(folded);
        if (added < 0 || PyDict_SetItem(live, offset, c) < 0)
            goto fail;
    }
    if (PySet_GET_SIZE(seen) != n || PyDict_GET_SIZE(live) != n)
        goto refuse;
    out = PyTuple_Pack(2, prefix, live);
    goto done;
refuse:
    out = Py_NewRef(Py_None);
    goto done;
fail:
    out = NULL;
done:
    Py_XDECREF(seen);
    Py_XDECREF(live);
    Py_XDECREF(own_prefix);
    return out;
}

PyDoc_STRVAR(listed_doc,
"listed(buf, base, pos, limit, live, records) -> (end, small, count)\n\n"
"Walk._listed of the listed records from pos on, one after the other, read from buf (the bytes\n"
"from file offset base), each stored in records as _listed stores it: end is where the first one\n"
"it does not read so begins (pos when none), small whether the last read holds few bytes, count\n"
"how many it read.");

static PyObject *listed(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Py_ssize_t base, pos, limit, count = 0;
    PyObject *live, *records;
    PyObject *key = NULL, *out = NULL;
    unsigned long long last_size = 0;
    if (!PyArg_ParseTuple(args, "y*nnnO!O!", &view, &base, &pos, &limit, &PyDict_Type, &live, &PyDict_Type, &records))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t len = view.len;
    if (base < 0 || pos < base || limit < pos || limit > PY_SSIZE_T_MAX / 2) /* no sum below overflows */
        goto finish;
    while (pos < limit) {
        key = PyLong_FromSsize_t(pos);
        if (key == NULL)
            goto fail;
        PyObject *central = PyDict_GetItemWithError(live, key); /* borrowed */
        if (central == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break;
        }
        PyObject *raw = field(central, 0), *name = field(central, 1), *crc_obj = field(central, 3),
                 *size_obj = field(central, 4), *offset = field(central, 5);
        if (raw == NULL || !PyBytes_Check(raw) || offset == NULL || !PyLong_Check(crc_obj) || !PyLong_Check(size_obj))
            break;
        unsigned long long size = PyLong_AsUnsignedLongLong(size_obj);
        unsigned long long ccrc = PyLong_AsUnsignedLongLong(crc_obj);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            break;
        }
        Py_ssize_t rel = pos - base;
        if (rel > len || len - rel < 30)
            break;
        const unsigned char *h = buf + rel;
        unsigned flags = u16(h + 6);
        unsigned long crc = u32(h + 14), csize = u32(h + 18), usize = u32(h + 22);
        Py_ssize_t nlen = u16(h + 26), xlen = u16(h + 28);
        Py_ssize_t name_at = rel + 30, name_end = name_at + nlen;
        if (u32(h) != SIG_LOCAL || u16(h + 4) > MAX_VERSION_NEEDED || (flags & ~FLAGS_ALLOWED) || u16(h + 8)
                || len - name_end < xlen || nlen != PyBytes_GET_SIZE(raw)
                || memcmp(buf + name_at, PyBytes_AS_STRING(raw), (size_t)nlen) != 0 || xlen < 4
                || u16(buf + name_end) != TAG_PADDING || (Py_ssize_t)u16(buf + name_end + 2) != xlen - 4)
            break;
        int described = (flags & FLAG_DESCRIPTOR) != 0;
        if (!(described && crc == 0 && csize == 0 && usize == 0)
                && !(usize == csize && usize == size && crc == ccrc && size != MAX32))
            break;
        Py_ssize_t data = pos + 30 + nlen + xlen;
        if (data > limit || size > (unsigned long long)(limit - data))
            break;
        Py_ssize_t end = data + (Py_ssize_t)size;
        if (described) {
            if ((unsigned long long)pos >= MAX32 || size >= MAX32)
                break;
            Py_ssize_t at = end - base;
            if (at > len || len - at < 16)
                break; /* the descriptor is past the window: the Python code reads it */
            const unsigned char *d = buf + at;
            if (u32(d) != SIG_DESCRIPTOR || u32(d + 4) != ccrc || u32(d + 8) != size || u32(d + 12) != size)
                break;
            end += 16;
        }
        PyObject *record = PyTuple_New(3), *data_obj = PyLong_FromSsize_t(data);
        if (record == NULL || data_obj == NULL) {
            Py_XDECREF(record);
            Py_XDECREF(data_obj);
            goto fail;
        }
        PyTuple_SET_ITEM(record, 0, Py_NewRef(name));
        PyTuple_SET_ITEM(record, 1, Py_NewRef(size_obj));
        PyTuple_SET_ITEM(record, 2, data_obj);
        PyObject_GC_UnTrack(record); /* str and int: no cycle (the collector would untrack it) */
        /* keyed by the directory's own int (equal to pos): later lookups by it find it at once */
        int stored = PyDict_SetItem(records, PyObject_RichCompareBool(offset, key, Py_EQ) == 1 ? offset : key, record);
        Py_DECREF(record);
        if (stored < 0)
            goto fail;
        Py_CLEAR(key);
        last_size = size;
        pos = end;
        count++;
    }
finish:
    out = Py_BuildValue("(nOn)", pos, last_size < (64 << 10) / 16 ? Py_True : Py_False, count);
    goto done;
fail:
    out = NULL;
done:
    Py_XDECREF(key);
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(entries_doc,
"entries(centrals, records, entry_type, out) -> list | None\n\n"
"zipread._entries into the empty dict out (name: ZipEntry, in directory order); the names that are\n"
"not lower case, as (lower-cased, name) pairs; None when a record is missing.");

static PyObject *entries(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *centrals, *records, *type, *out;
    PyObject *folded = NULL;
    if (!PyArg_ParseTuple(args, "O!O!OO!", &PyList_Type, &centrals, &PyDict_Type, &records, &type, &PyDict_Type, &out))
        return NULL;
    if (!is_named_tuple_type(type, 5)) {
        PyErr_SetString(PyExc_TypeError, "entry_type must be a 5-field NamedTuple class");
        return NULL;
    }
    folded = PyList_New(0);
    if (folded == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(centrals); i++) {
        PyObject *c = PyList_GET_ITEM(centrals, i);
        PyObject *name = field(c, 1), *crc = field(c, 3), *size = field(c, 4), *offset = field(c, 5);
        if (offset == NULL || name == NULL || !PyUnicode_Check(name) || !PyUnicode_IS_COMPACT_ASCII(name))
            goto refuse;
        PyObject *record = PyDict_GetItemWithError(records, offset); /* borrowed */
        if (record == NULL) {
            if (PyErr_Occurred())
                goto fail;
            goto refuse;
        }
        PyObject *data = field(record, 2);
        if (data == NULL || !PyLong_Check(offset) || !PyLong_Check(data) || !PyLong_Check(size) || !PyLong_Check(crc))
            goto refuse;
        PyObject *items[5] = {Py_NewRef(name), Py_NewRef(offset), Py_NewRef(data), Py_NewRef(size), Py_NewRef(crc)};
        PyObject *entry = named((PyTypeObject *)type, items, 5);
        if (entry == NULL)
            goto fail;
        int stored = PyDict_SetItem(out, name, entry);
        Py_DECREF(entry);
        if (stored < 0)
            goto fail;
        PyObject *lower = ascii_lower(name);
        if (lower == NULL)
            goto fail;
        int appended = 0;
        if (lower != name) {
            PyObject *pair = PyTuple_Pack(2, lower, name);
            appended = pair == NULL ? -1 : PyList_Append(folded, pair);
            Py_XDECREF(pair);
        }
        Py_DECREF(lower);
        if (appended < 0)
            goto fail;
    }
    return folded;
refuse:
    Py_DECREF(folded);
    Py_RETURN_NONE;
fail:
    Py_DECREF(folded);
    return NULL;
}

/* Whether two str hold the same characters (both compact ASCII, else no). */
static int same_ascii(PyObject *a, PyObject *b) {
    return PyUnicode_Check(a) && PyUnicode_Check(b) && PyUnicode_IS_COMPACT_ASCII(a) && PyUnicode_IS_COMPACT_ASCII(b)
           && PyUnicode_GET_LENGTH(a) == PyUnicode_GET_LENGTH(b)
           && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)PyUnicode_GET_LENGTH(a)) == 0;
}

/* Whether two int are equal (1), not (0), or an error (-1). */
static int same_int(PyObject *a, PyObject *b) {
    if (!PyLong_Check(a) || !PyLong_Check(b))
        return 0;
    return a == b ? 1 : PyObject_RichCompareBool(a, b, Py_EQ);
}

#define MAX_JUMPS 64 /* records listed out of the old order found by a scan, before the dictionaries take over */

PyDoc_STRVAR(appended_doc,
"appended(live, olds, base_length) -> (before, superseded) | None\n\n"
"zipread._listed_before, and the old records the new directory no longer lists (in order), when\n"
"every record it lists before base_length is a record of olds (the old archive's entries) with\n"
"its name, size and CRC, listed mostly in their order; None otherwise (the dictionaries then\n"
"find them).");

static PyObject *appended(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *live, *olds, *base_obj;
    PyObject *before = NULL, *superseded = NULL, *out = NULL;
    long long *offsets = NULL;
    char *matched = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &live, &PyList_Type, &olds, &PyLong_Type, &base_obj))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(olds), j = 0, jumps = 0;
    long long base_length = PyLong_AsLongLong(base_obj);
    if (base_length == -1 && PyErr_Occurred())
        goto refuse;
    offsets = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof *offsets);
    matched = PyMem_Calloc((size_t)(n > 0 ? n : 1), 1);
    before = PyDict_New();
    superseded = PyList_New(0);
    if (offsets == NULL || matched == NULL || before == NULL || superseded == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *off = field(PyList_GET_ITEM(olds, i), 1);
        offsets[i] = off != NULL && PyLong_Check(off) ? PyLong_AsLongLong(off) : -1;
        if (offsets[i] < 0)
            goto refuse;
    }
    Py_ssize_t at = 0;
    PyObject *off, *c;
    while (PyDict_Next(live, &at, &off, &c)) {
        long long value = PyLong_Check(off) ? PyLong_AsLongLong(off) : -1;
        if (value < 0)
            goto refuse;
        if (value >= base_length)
            continue;
        Py_ssize_t idx = j;
        if (idx >= n || offsets[idx] != value) { /* out of the old order: scanned for, a few times */
            if (++jumps > MAX_JUMPS)
                goto refuse;
            for (idx = 0; idx < n && offsets[idx] != value; idx++)
                ;
            if (idx == n)
                goto refuse;
        }
        if (matched[idx])
            goto refuse;
        matched[idx] = 1;
        j = idx + 1;
        PyObject *old = PyList_GET_ITEM(olds, idx);
        /* c: (raw_name, name, flags, crc, size, header_offset); old: (name, header, data, size, crc) */
        PyObject *name = field(c, 1), *crc = field(c, 3), *size = field(c, 4);
        PyObject *old_name = field(old, 0), *old_data = field(old, 2), *old_size = field(old, 3),
                 *old_crc = field(old, 4);
        if (size == NULL || old_crc == NULL || !same_ascii(name, old_name))
            goto refuse;
        int same_size = same_int(size, old_size), same_crc = same_size > 0 ? same_int(crc, old_crc) : 0;
        if (same_size < 0 || same_crc < 0)
            goto fail;
        if (!same_size || !same_crc)
            goto refuse;
        PyObject *record = PyTuple_Pack(3, old_name, old_size, old_data);
        if (record != NULL)
            PyObject_GC_UnTrack(record); /* str and int: no cycle */
        int stored = record == NULL ? -1 : PyDict_SetItem(before, off, record);
        Py_XDECREF(record);
        if (stored < 0)
            goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!matched[i] && PyList_Append(superseded, PyList_GET_ITEM(olds, i)) < 0)
            goto fail;
    out = PyTuple_Pack(2, before, superseded);
    goto done;
refuse:
    PyErr_Clear();
    out = Py_NewRef(Py_None);
    goto done;
fail:
    out = NULL;
done:
    PyMem_Free(offsets);
    PyMem_Free(matched);
    Py_XDECREF(before);
    Py_XDECREF(superseded);
    return out;
}

PyDoc_STRVAR(precede_doc,
"precede(centrals, records) -> bool\n\n"
"Whether every entry of a superseded directory names a walked record with its name and size.");

static PyObject *precede(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *centrals, *records;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &centrals, &PyDict_Type, &records))
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(centrals); i++) {
        PyObject *c = PyList_GET_ITEM(centrals, i);
        PyObject *offset = field(c, 5);
        if (offset == NULL)
            Py_RETURN_FALSE;
        PyObject *record = PyDict_GetItemWithError(records, offset); /* borrowed */
        if (record == NULL) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_FALSE;
        }
        PyObject *size = field(record, 1);
        if (size == NULL || !same_ascii(field(c, 1), field(record, 0)))
            Py_RETURN_FALSE;
        int same = same_int(field(c, 4), size);
        if (same < 0)
            return NULL;
        if (!same)
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(skip_doc,
"skip(buf, base, pos, limit) -> (end, count)\n\n"
"The central directory entries from pos on whose first 34 bytes buf (the bytes from file offset\n"
"base) holds, one after the other, as Walk.superseded_directory steps over them: where the\n"
"first it does not step over begins, and how many it did (none past limit).");

static PyObject *skip(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Py_ssize_t base, pos, limit, count = 0;
    if (!PyArg_ParseTuple(args, "y*nnn", &view, &base, &pos, &limit))
        return NULL;
    const unsigned char *buf = view.buf;
    while (base >= 0 && pos >= base && limit <= PY_SSIZE_T_MAX / 2 && pos - base <= view.len
           && view.len - (pos - base) >= 34) {
        const unsigned char *e = buf + (pos - base);
        if (u32(e) != SIG_CENTRAL)
            break;
        Py_ssize_t next = pos + 46 + (Py_ssize_t)u16(e + 28) + (Py_ssize_t)u16(e + 30) + (Py_ssize_t)u16(e + 32);
        if (next > limit)
            break;
        pos = next;
        count++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", pos, count);
}

static PyMethodDef methods[] = {
    {"directory", directory, METH_VARARGS, directory_doc},
    {"names", names, METH_VARARGS, names_doc},
    {"listed", listed, METH_VARARGS, listed_doc},
    {"entries", entries, METH_VARARGS, entries_doc},
    {"appended", appended, METH_VARARGS, appended_doc},
    {"precede", precede, METH_VARARGS, precede_doc},
    {"skip", skip, METH_VARARGS, skip_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_zipscan",
    "The common case of ckptmigrate.formats.zipread's parse, in C (None for anything else).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__zipscan(void) { return PyModule_Create(&module); }
