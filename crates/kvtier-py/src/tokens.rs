//! Token ids from Python: a list of ints, a numpy array or a CPU torch tensor, as `u32`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::buffer::{buffer_ffi, BufferView};

/// Token ids from a list/tuple of ints, a numpy array or a torch tensor.
pub(crate) fn tokens_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Some(v) = tokens_fast(obj)? {
        return Ok(v);
    }
    if let Ok(v) = obj.extract::<Vec<u32>>() {
        return Ok(v);
    }
    if obj.hasattr("tolist")? {
        let l = obj.call_method0("tolist")?;
        return l.extract::<Vec<u32>>().map_err(|_| {
            PyValueError::new_err("tokens must be a 1-D sequence of integers in 0..2**32")
        });
    }
    Err(PyTypeError::new_err(
        "tokens must be a sequence of integers in 0..2**32 (list, numpy array, torch tensor)",
    ))
}

/// The head of CPython's `PyListObject` (every GIL build of 3.x: the object header, the
/// size, then the item array). The stable ABI only offers `PyList_GetItem`, a function call
/// per token; reading the array directly keeps list conversion as fast as the non-abi3
/// build. [`list_layout_ok`] checks the layout against the running interpreter once.
#[repr(C)]
struct ListHead {
    ob_refcnt: isize,
    ob_type: *mut std::os::raw::c_void,
    ob_size: isize,
    ob_item: *mut *mut pyo3::ffi::PyObject,
}

static LIST_LAYOUT_OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether [`ListHead`] matches this interpreter's lists (checked on a 3-item list).
fn list_layout_ok(py: Python<'_>) -> bool {
    *LIST_LAYOUT_OK.get_or_init(|| {
        let Ok(probe) = PyList::new(py, [11u32, 22, 33]) else {
            return false;
        };
        // SAFETY: a live list; we only read its header and compare pointers.
        unsafe {
            let head = &*(probe.as_ptr() as *const ListHead);
            head.ob_size == 3
                && !head.ob_item.is_null()
                && (0..3).all(|i| {
                    *head.ob_item.add(i) == pyo3::ffi::PyList_GetItem(probe.as_ptr(), i as isize)
                })
        }
    })
}

/// The item array of an exact list when the layout check passed.
fn list_items(list: &Bound<'_, PyList>) -> Option<*mut *mut pyo3::ffi::PyObject> {
    if !list_layout_ok(list.py()) {
        return None;
    }
    // SAFETY: layout verified above; the list is alive (we hold a reference).
    let head = unsafe { &*(list.as_ptr() as *const ListHead) };
    Some(head.ob_item)
}

/// How this interpreter lays out an `int`'s size word, which follows the object header and
/// precedes the 30-bit digits in every 64-bit CPython build of 3.x. The stable ABI only
/// offers `PyLong_AsUnsignedLongLong`, a function call with overflow checks per token; a
/// token id is one or two digits, read here directly. [`int_layout`] checks the guess on
/// probe values of known value once, and without a match every int goes through the
/// function.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum IntLayout {
    /// CPython <= 3.11: a signed digit count, negative for negative numbers.
    SignedSize,
    /// CPython >= 3.12: `lv_tag`, the digit count shifted left by 3 over a 2-bit sign
    /// (0 positive, 1 zero, 2 negative).
    Tagged,
}

/// The head of an `int`: object header and size word; the digits (`u32`) follow it.
#[repr(C)]
struct IntHead {
    ob_refcnt: isize,
    ob_type: *mut std::os::raw::c_void,
    size: usize,
}

static INT_LAYOUT: std::sync::OnceLock<Option<IntLayout>> = std::sync::OnceLock::new();

/// This interpreter's [`IntLayout`], when reading probe ints under it gives their values: ints
/// of zero, one and two digits (small cached ones among them), and no value for a negative
/// one; `None` otherwise.
fn int_layout(py: Python<'_>) -> Option<IntLayout> {
    *INT_LAYOUT.get_or_init(|| {
        let guess = if py.version_info() >= (3, 12) {
            IntLayout::Tagged
        } else {
            IntLayout::SignedSize
        };
        let values: [i64; 12] = [
            0,
            1,
            7,
            255,
            256,
            1000,
            151_643,
            (1 << 30) - 1,
            1 << 30,
            (1 << 31) + 5,
            u32::MAX as i64,
            -1,
        ];
        let all_match = values.iter().all(|&v| {
            let obj = v.into_pyobject(py).expect("an int from an i64");
            // SAFETY: a live int object; read_int only reads its head.
            let got = unsafe { read_int(obj.as_ptr(), guess) };
            let want = u32::try_from(v).ok();
            got == want
        });
        all_match.then_some(guess)
    })
}

/// The value of an exact `int` of at most two digits that fits in u32, read under `layout`;
/// `None` for anything else (negative, larger): the caller asks the C API then.
///
/// # Safety
/// `item` is a live object of type exactly `int`, and `layout` passed [`int_layout`].
unsafe fn read_int(item: *mut pyo3::ffi::PyObject, layout: IntLayout) -> Option<u32> {
    let head = item as *const IntHead;
    let size = (*head).size;
    let (digits, negative) = match layout {
        IntLayout::SignedSize => ((size as isize).unsigned_abs(), (size as isize) < 0),
        IntLayout::Tagged => (size >> 3, size & 3 == 2),
    };
    // Only the digits the int has are read: an int of one digit may be allocated without
    // room for a second.
    let first = head.add(1) as *const u32;
    match (negative, digits) {
        (true, _) => None,
        (false, 0) => Some(0),
        (false, 1) => Some(*first),
        (false, 2) => u32::try_from(u64::from(*first) | u64::from(*first.add(1)) << 30).ok(),
        _ => None,
    }
}

/// How a list's ints are read on this interpreter: `"digits"` (their memory, the fast
/// path) or `"c-api"` (one `PyLong_AsUnsignedLongLong` call each, where the layout check
/// failed). For tests and diagnostics.
#[pyfunction]
pub(crate) fn token_list_reader(py: Python<'_>) -> &'static str {
    match int_layout(py) {
        Some(_) => "digits",
        None => "c-api",
    }
}

fn out_of_range() -> PyErr {
    PyValueError::new_err("tokens must be integers in 0..2**32")
}

/// Token ids of another integer type, each checked to fit in u32.
fn narrow<T: Copy + TryInto<u32>>(xs: &[T]) -> PyResult<Vec<u32>> {
    xs.iter()
        .map(|&x| x.try_into().map_err(|_| out_of_range()))
        .collect()
}

/// Fast paths of [`tokens_of`] for the shapes prompts usually come in. A 128K-token prompt
/// is 131,072 Python objects: the generic `extract::<Vec<u32>>` goes through the iterator
/// protocol per item (and, for numpy arrays and torch tensors, creates a scalar object per
/// item), which costs more than hashing the prompt. Here an exact `list`'s item array is
/// walked directly and its ints read from their digits ([`read_int`], the C API for any
/// other int), and a 1-D C-contiguous int32/int64/uint32/uint64 numpy array
/// or CPU torch int32/int64 tensor is read from its memory. `None`: not one of these shapes
/// (the caller falls back to the generic path, which also produces the error messages).
fn tokens_fast(obj: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u32>>> {
    if let Ok(list) = obj.downcast_exact::<PyList>() {
        let n = list.len();
        let mut v = Vec::with_capacity(n);
        let int_type = std::ptr::addr_of_mut!(pyo3::ffi::PyLong_Type);
        let direct = list_items(list);
        let layout = int_layout(obj.py());
        for i in 0..n {
            let item = match direct {
                // SAFETY: i < len; the list is not mutated while we read (no Python code runs).
                Some(items) => unsafe { *items.add(i) },
                // SAFETY: as above; PyList_GetItem returns a borrowed reference and checks i.
                None => unsafe { pyo3::ffi::PyList_GetItem(list.as_ptr(), i as isize) },
            };
            if item.is_null() {
                return Err(PyErr::fetch(obj.py()));
            }
            // Exact ints (nearly every token) are told by their type pointer; the flags
            // lookup of PyLong_Check is a function call under the stable ABI.
            let exact = unsafe { pyo3::ffi::Py_TYPE(item) } == int_type;
            if !exact && unsafe { pyo3::ffi::PyLong_Check(item) } == 0 {
                return Ok(None);
            }
            if let Some(layout) = layout.filter(|_| exact) {
                // SAFETY: an exact int (checked above) under a verified layout.
                if let Some(x) = unsafe { read_int(item, layout) } {
                    v.push(x);
                    continue;
                }
            }
            let x = unsafe { pyo3::ffi::PyLong_AsUnsignedLongLong(item) };
            if x == u64::MAX && PyErr::take(obj.py()).is_some() || x > u32::MAX as u64 {
                return Err(out_of_range());
            }
            v.push(x as u32);
        }
        return Ok(Some(v));
    }
    if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
        // A torch tensor: only CPU, 1-D, contiguous int32/int64 are read in place.
        let dtype = obj.getattr("dtype")?.str()?.to_string();
        let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
        let dim: usize = obj.call_method0("dim")?.extract()?;
        let contiguous: bool = obj.call_method0("is_contiguous")?.extract()?;
        if device != "cpu" || dim != 1 || !contiguous {
            return Ok(None);
        }
        let ptr: usize = obj.call_method0("data_ptr")?.extract()?;
        let n: usize = obj.call_method0("numel")?.extract()?;
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        // SAFETY: a contiguous CPU tensor of n elements of this dtype starts at data_ptr and
        // stays alive (the caller holds it) while we copy out under the GIL.
        return match dtype.as_str() {
            "torch.int64" => {
                narrow(unsafe { std::slice::from_raw_parts(ptr as *const i64, n) }).map(Some)
            }
            "torch.int32" => {
                narrow(unsafe { std::slice::from_raw_parts(ptr as *const i32, n) }).map(Some)
            }
            _ => Ok(None),
        };
    }
    if obj.hasattr("__array_interface__")? {
        return int_buffer(obj);
    }
    Ok(None)
}

/// The integers of a 1-D C-contiguous buffer of int32/int64/uint32/uint64 in native byte
/// order (a numpy array), narrowed to u32; `None` for any other buffer.
fn int_buffer(obj: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u32>>> {
    let flags = buffer_ffi::PYBUF_FORMAT | buffer_ffi::PYBUF_C_CONTIGUOUS;
    let Ok(view) = BufferView::get(obj, flags) else {
        return Ok(None);
    };
    let b = &*view.0;
    if b.ndim != 1 || b.format.is_null() || b.itemsize <= 0 {
        return Ok(None);
    }
    // SAFETY: a NUL-terminated struct-module format string owned by the view.
    let fmt = unsafe { std::ffi::CStr::from_ptr(b.format) }.to_bytes();
    let code = match fmt {
        [c] => *c,
        [b'@' | b'=', c] => *c,
        [b'<', c] if cfg!(target_endian = "little") => *c,
        [b'>' | b'!', c] if cfg!(target_endian = "big") => *c,
        _ => return Ok(None),
    };
    let n = (b.len / b.itemsize) as usize;
    if n == 0 {
        return Ok(Some(Vec::new()));
    }
    let signed = b"bhilqn".contains(&code);
    let unsigned = b"BHILQN".contains(&code);
    // SAFETY: a C-contiguous buffer of n items of itemsize bytes, alive while `view` is.
    unsafe {
        match (signed, unsigned, b.itemsize) {
            (true, _, 8) => narrow(std::slice::from_raw_parts(b.buf as *const i64, n)).map(Some),
            (true, _, 4) => narrow(std::slice::from_raw_parts(b.buf as *const i32, n)).map(Some),
            (_, true, 8) => narrow(std::slice::from_raw_parts(b.buf as *const u64, n)).map(Some),
            (_, true, 4) => narrow(std::slice::from_raw_parts(b.buf as *const u32, n)).map(Some),
            _ => Ok(None),
        }
    }
}
