//! Zero-copy views of Python memory: the buffer protocol under the stable ABI, and byte
//! views of numpy arrays / CPU torch tensors.

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

/// `PyObject_GetBuffer`, `PyBuffer_Release` and `Py_buffer`, declared here because pyo3 only
/// offers them under the stable ABI from Python 3.11 (when they joined it). Every CPython 3.x
/// exports both functions and has this struct layout (unchanged since 3.3), so the abi3
/// wheel uses them on 3.10 as well; the symbols resolve when the interpreter loads the module.
pub(crate) mod buffer_ffi {
    use pyo3::ffi::{PyObject, Py_ssize_t};
    use std::os::raw::{c_char, c_int, c_void};

    /// `Py_buffer`.
    #[repr(C)]
    pub struct PyBuffer {
        pub buf: *mut c_void,
        pub obj: *mut PyObject,
        pub len: Py_ssize_t,
        pub itemsize: Py_ssize_t,
        pub readonly: c_int,
        pub ndim: c_int,
        pub format: *mut c_char,
        pub shape: *mut Py_ssize_t,
        pub strides: *mut Py_ssize_t,
        pub suboffsets: *mut Py_ssize_t,
        pub internal: *mut c_void,
    }

    pub const PYBUF_WRITABLE: c_int = 0x0001;
    pub const PYBUF_FORMAT: c_int = 0x0004;
    /// `PyBUF_C_CONTIGUOUS` (implies shape and strides).
    pub const PYBUF_C_CONTIGUOUS: c_int = 0x0038;

    extern "C" {
        pub fn PyObject_GetBuffer(obj: *mut PyObject, view: *mut PyBuffer, flags: c_int) -> c_int;
        pub fn PyBuffer_Release(view: *mut PyBuffer);
    }
}

/// A buffer-protocol view of an object, released on drop (the GIL must be held then: these
/// are dropped on the calling Python thread).
pub(crate) struct BufferView(pub(crate) Box<buffer_ffi::PyBuffer>);

impl BufferView {
    /// `PyObject_GetBuffer(obj, flags)`; the Python error when the object refuses.
    pub(crate) fn get(
        obj: &Bound<'_, PyAny>,
        flags: std::os::raw::c_int,
    ) -> Result<BufferView, PyErr> {
        // SAFETY: an all-zero Py_buffer is a valid "empty" view for GetBuffer to fill.
        let mut view: Box<buffer_ffi::PyBuffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: obj is a live object (we hold a reference and the GIL).
        let rc = unsafe { buffer_ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            return Err(PyErr::take(obj.py())
                .unwrap_or_else(|| PyBufferError::new_err("the object refused a buffer view")));
        }
        Ok(BufferView(view))
    }
}

impl Drop for BufferView {
    fn drop(&mut self) {
        // SAFETY: a view GetBuffer filled, released once, with the GIL held.
        unsafe { buffer_ffi::PyBuffer_Release(&mut *self.0) };
    }
}

/// A contiguous byte region borrowed from a Python object, kept valid while this lives.
pub(crate) struct ByteView {
    ptr: *mut u8,
    len: usize,
    /// The buffer-protocol view to release on drop (None for torch tensors, which stay
    /// alive through the Python reference the caller holds).
    _view: Option<BufferView>,
}

impl ByteView {
    /// Borrows the bytes of `obj`: a CPU torch tensor (any dtype) or any object exporting a
    /// C-contiguous buffer (numpy array of any dtype, bytearray, memoryview, ...).
    pub(crate) fn new(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<ByteView> {
        if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
            return Self::from_tensor(obj, what);
        }
        let mut flags = buffer_ffi::PYBUF_C_CONTIGUOUS;
        if writable {
            flags |= buffer_ffi::PYBUF_WRITABLE;
        }
        let view = BufferView::get(obj, flags);
        if let Err(e) = view {
            let cause = e.to_string();
            let tname = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            return Err(PyBufferError::new_err(format!(
                "{what} must be a C-contiguous{} buffer (numpy array, CPU torch tensor, bytearray); got {tname}: {cause}{}",
                if writable { ", writable" } else { "" },
                if cause.contains("contiguous") {
                    " (use numpy.ascontiguousarray(x) or x.contiguous())"
                } else {
                    ""
                }
            )));
        }
        let view = view?;
        let len = view.0.len.max(0) as usize;
        let ptr = view.0.buf as *mut u8;
        Ok(ByteView {
            ptr,
            len,
            _view: Some(view),
        })
    }

    fn from_tensor(t: &Bound<'_, PyAny>, what: &str) -> PyResult<ByteView> {
        let device: String = t.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" {
            return Err(PyValueError::new_err(format!(
                "{what} is a torch tensor on `{device}`; kvtier reads and writes host memory: copy it to a CPU tensor (ideally pinned) first"
            )));
        }
        if !t.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(PyBufferError::new_err(format!(
                "{what} must be C-contiguous; call .contiguous() first"
            )));
        }
        let ptr: usize = t.call_method0("data_ptr")?.extract()?;
        let numel: usize = t.call_method0("numel")?.extract()?;
        let esize: usize = t.call_method0("element_size")?.extract()?;
        Ok(ByteView {
            ptr: ptr as *mut u8,
            len: numel * esize,
            _view: None,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
